"""The `vitlens` group, its commands, and `main`: every failure becomes one `error:` line and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from vitlens.cli.demo import demo
from vitlens.cli.evaluate import evaluate
from vitlens.cli.explain import explain
from vitlens.cli.finetune import finetune, finetune_compare
from vitlens.cli.lime import lime
from vitlens.cli.models import models
from vitlens.cli.occlusion import occlusion
from vitlens.cli.report import report
from vitlens.cli.run import run
from vitlens.cli.views import compare, heads, layers, swin
from vitlens.cli.whatif import whatif
from vitlens.errors import VitlensError
from vitlens.models.hf import VERBOSE_ENV

# click >= 8.2 raises this for a bare `vitlens`; older versions print the help themselves
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="vitlens")
@click.option("--verbose", is_flag=True, default=False,
              help="Let the libraries' own logging, warnings and progress bars through (VITLENS_VERBOSE=1).")
def cli(verbose: bool) -> None:
    """See what a Vision Transformer looks at: attention maps, rollout, gradient rollout, LIME, occlusion."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


for _command in (explain, heads, layers, compare, swin, lime, occlusion, whatif, models, demo, evaluate, report, run,
                 finetune, finetune_compare):
    cli.add_command(_command)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="vitlens", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:
        click.echo(e.ctx.get_help() if e.ctx else e.format_message(), err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        return 2
    except VitlensError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        return 2
    except OSError as e:  # a path the file system refuses (name too long, permission, ...) before any output
        where = f": {_one_line(str(e.filename))[:200]}" if e.filename else ""
        click.echo(f"error: {e.strerror or _one_line(str(e))}{where}; give another path", err=True)
        return 2
    except ImportError as e:  # an optional dependency missing or broken
        click.echo(f"error: a required package failed to import: {_one_line(str(e))[:300]}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
