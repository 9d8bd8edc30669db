"""`vitlens models`: the embedded models and the supported model families."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List the embedded models and the supported model families."""
    from vitlens.models import zoo
    from vitlens.models.loading import FAMILIES, SPEC_HELP

    found = zoo.zoo_models()
    click.echo("embedded models (--model vitlens:NAME):")
    if not found:
        click.echo("  none installed yet")
    for name in found:
        click.echo(f"  vitlens:{name}  ({zoo.model_summary(name)})")
    click.echo("supported families:")
    for key, text in FAMILIES.items():
        click.echo(f"  {key}: {text}")
    click.echo(f"--model takes {SPEC_HELP}")
