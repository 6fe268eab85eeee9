"""``herald``: the parser and the entry point.

Each command group lives in a module of its own (:mod:`consumer.cli.service`,
:mod:`~consumer.cli.publish`, :mod:`~consumer.cli.parked`, …) that adds its
parsers and binds each leaf parser to its handler with
``set_defaults(handler=...)``; :func:`main` parses, reads the settings once and
runs the handler. Usage and configuration errors are one line (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from consumer.cli import (
    campaign,
    demo,
    escalation,
    parked,
    prune,
    publish,
    retry_rules,
    service,
    stats,
    status,
)
from consumer.errors import BrokerUnreachable, ConfigError, TopologyMismatch
from consumer.settings import Settings, unknown_variables


class ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="herald", description="Reliable outbound messaging on RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    service.add_parsers(sub, _Parser)
    publish.add_parser(sub, _Parser)
    parked.add_parser(sub, _Parser)
    stats.add_parser(sub, _Parser)
    campaign.add_parser(sub, _Parser)
    retry_rules.add_parser(sub, _Parser)
    escalation.add_parser(sub, _Parser)
    prune.add_parser(sub, _Parser)
    status.add_parser(sub, _Parser)
    demo.add_parser(sub, _Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        code = _main(argv)
    except (ArgumentError, ConfigError) as exc:
        print(f"herald: {exc}" if isinstance(exc, ConfigError) else str(exc), file=sys.stderr)
        code = 2
    except (BrokerUnreachable, TopologyMismatch) as exc:
        print(f"herald: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    from consumer import logs

    logs.configure(settings.log_level)
    for warning in unknown_variables():
        logs.get_logger("herald.settings").warning("settings.unknown_variable", detail=warning)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code: int = runner.run(args.handler(args, settings))
        return code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the same asyncio API with far cheaper I/O per message."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
