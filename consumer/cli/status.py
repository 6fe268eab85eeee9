"""``herald status MESSAGE_ID``: where a message is and how it got there.

Prints the message's current status, its per-status times and last error,
then its whole history in time order (see :mod:`consumer.records.history`).
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import asyncpg

from consumer.logs import mask_recipient
from consumer.records.history import STATUS_TIMES, MessageStatus, iso, load_status
from consumer.settings import Settings
from consumer.text import printable


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="a message's status and its history")
    status.add_argument("message_id", help="the message's idempotency key")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--reveal", action="store_true", help="show the recipient unmasked")
    status.set_defaults(handler=_status)


def render(status: MessageStatus, *, reveal: bool = False) -> str:
    """The human form: a header, then the history one event a line.

    Ids, recipients, error texts and history lines come from publishers and
    providers: their control characters are shown escaped, and none of them
    can start a line of its own.
    """
    m: dict[str, Any] = {k: printable(v) if isinstance(v, str) else v
                         for k, v in status.message.items()}
    recipient = status.message["recipient"] if reveal else mask_recipient(
        status.message["recipient"])
    via = m["channel"] + (f" via {m['provider']}" if m["provider"] else "")
    if m["provider_message_id"]:
        via += f", provider id {m['provider_message_id']}"
    lines = [
        f"message   {m['message_id']}",
        f"status    {m['status']}  ({via})",
        f"to        {printable(recipient or '')}"
        + (f"   campaign {m['campaign_id']}" if m["campaign_id"] else ""),
        f"attempts  {m['attempts']}"
        + (f"   next at {iso(m['next_attempt_at'])}" if m["next_attempt_at"] else ""),
    ]
    times = [f"{s} {iso(m[f'{s}_at'])}" for s in STATUS_TIMES if m[f"{s}_at"] is not None]
    if times:
        lines.append("times     " + "\n          ".join(times))
    if m["last_error_type"]:
        error = m["last_error_type"] + (f" {m['last_error_code']}" if m["last_error_code"]
                                        else "")
        if m["last_error"]:
            error += f": {m['last_error']}"
        lines.append(f"error     {error}")
    lines.append("history")
    if not status.history:
        lines.append("  (none)")
    width = max((len(e.kind) for e in status.history), default=0)
    for entry in status.history:
        lines.append(f"  {iso(entry.at)}  {entry.kind:<{width}}  {printable(entry.what)}")
    return "\n".join(lines)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.records.retention import tombstone

    conn = await asyncpg.connect(settings.database_url)
    try:
        status = await load_status(conn, args.message_id)
        pruned = await tombstone(conn, args.message_id) if status is None else None
    finally:
        await conn.close()
    if pruned is not None:
        # The row and its history are gone; the id is still never sent again.
        if args.json:
            print(json.dumps({"message": {k: iso(v) if k == "finished_at" else v
                                          for k, v in pruned.items()}, "history": []},
                             indent=2))
        else:
            print(f"message   {printable(args.message_id)}\n"
                  f"status    {pruned['status']}, pruned (finished {iso(pruned['finished_at'])});"
                  " its history is gone, the id is still never sent again")
        return 0
    if status is None:
        print(f"herald: no message {printable(repr(args.message_id))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.to_json(reveal=args.reveal), indent=2))
    else:
        print(render(status, reveal=args.reveal))
    return 0

