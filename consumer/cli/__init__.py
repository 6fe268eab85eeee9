"""The ``herald`` command line (entry point ``consumer.cli:main``)."""

from consumer.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
