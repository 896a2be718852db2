"""The `hyfx` command line: argument parsing and printing only; the work is done by the public API."""

from hyfx.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
