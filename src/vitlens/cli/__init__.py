"""The `vitlens` command line: one module a job, each parsing options and calling the library.

Every user-facing failure is one line ``error: <message>`` on stderr with exit status 2, and nothing half-written.
This module stays light so that Ctrl-C while the library is still importing is one line too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0; 2 with one `error:` line; 130 when interrupted)."""
    try:
        from vitlens.cli.app import main as run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return run(argv)


def __getattr__(name: str):  # `from vitlens.cli import cli` without importing every command up front
    if name == "cli":
        from vitlens.cli.app import cli

        return cli
    raise AttributeError(name)


__all__ = ["cli", "main"]
