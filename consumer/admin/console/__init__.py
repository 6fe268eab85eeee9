"""The operator console at ``/console/``: the parking lot in a browser.

Server-rendered pages (aiohttp + Jinja2, no build step) for people on call:
an overview of what flows and what is stuck, the parking lot with filters,
counts and background replays, one message's whole timeline with
edit-then-replay, and campaigns against their targets. Sign-in with an admin
token (:mod:`consumer.admin.tokens`), sessions and CSRF in
:mod:`~consumer.admin.console.sessions`, routes in :mod:`~consumer.admin.console.app`.
"""

from consumer.admin.console.app import add_console_routes

__all__ = ["add_console_routes"]
