"""The `vitlens` command line: one module a job, each parsing options and calling the library.

Every user-facing failure is one line ``error: <message>`` on stderr with exit status 2, and nothing half-written.
"""

from vitlens.cli.main import cli, main

__all__ = ["cli", "main"]
