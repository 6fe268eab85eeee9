"""The ``herald`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from consumer.errors import ConfigError
from consumer.ops_cmd import add_parsers as add_operator_parsers
from consumer.settings import Settings


class ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="herald", description="Reliable outbound messaging on RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the service: consumers, webhooks, admin, metrics")
    run.add_argument("--channels", help="comma-separated channels to consume (default: all "
                     "channels with credentials)")
    run.add_argument("--roles", default="senders,events,gateway",
                     help="comma-separated roles: senders (channel consumers), events (status "
                          "updates), gateway (webhooks and admin API); default all")

    sub.add_parser("migrate", help="apply pending database migrations")

    topology = sub.add_parser("topology", help="declare or export exchanges and queues")
    topology_sub = topology.add_subparsers(dest="topology_command", required=True,
                                           parser_class=_Parser)
    topology_sub.add_parser("declare", help="declare everything on the broker (idempotent)")
    topology_sub.add_parser("export", help="print RabbitMQ definitions JSON")

    publish = sub.add_parser("publish", help="publish send requests with publisher confirms")
    publish.add_argument("--file", help="JSONL file of send requests ('-' for stdin)")
    publish.add_argument("--channel", choices=("http", "sms", "whatsapp", "messenger"))
    publish.add_argument("--to", help="recipient")
    publish.add_argument("--body", help="message text (JSON allowed for http)")
    publish.add_argument("--message-id", help="idempotency key (default: a new UUID)")
    publish.add_argument("--campaign", help="campaign id")
    publish.add_argument("--max-attempts", type=int)
    publish.add_argument("--send-at", help="ISO-8601 time with a zone")
    publish.add_argument("--expires-at", help="ISO-8601 time with a zone")
    publish.add_argument("--quiet", action="store_true", help="no progress output")
    publish.add_argument("--csv", help="recipients CSV ('to' column): one message per row of"
                         " --campaign, with --channel and --body-template")
    publish.add_argument("--body-template", help="body text with {column} fields of --csv")

    add_operator_parsers(sub, _Parser)

    status = sub.add_parser("status", help="a message's status and its history")
    status.add_argument("message_id", help="the message's idempotency key")
    status.add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser("demo", help="send a sample campaign through a running Herald and "
                          "the sandbox, with a live view")
    demo.add_argument("--sandbox-url", help="default http://127.0.0.1:$HERALD_SANDBOX_PORT")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to watch at most")

    sandbox = sub.add_parser("sandbox", help="run local fake providers for demos and tests")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, help="default HERALD_SANDBOX_PORT (8090)")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        code = _main(argv)
    except (ArgumentError, ConfigError) as exc:
        print(f"herald: {exc}" if isinstance(exc, ConfigError) else str(exc), file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    from consumer import logs

    logs.configure(settings.log_level)
    from consumer import commands

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(commands.dispatch(args, settings))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the same asyncio API with far cheaper I/O per message."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
