"""`chargepki crl publish`: one CRL per CA into the publication directory, once or on a timer."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import click

from cli.common import State, pass_state
from cli.params import DURATION
from crl.publisher import DEFAULT_VALIDITY, publish_all


@click.group()
def crl() -> None:
    """Certificate revocation lists (RFC 5280)."""


@crl.command("publish")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Publication directory (default: <home>/pki), served at the CRL URL of the certificates.",
)
@click.option(
    "--next-update",
    "validity",
    type=DURATION,
    default=f"{DEFAULT_VALIDITY.days}d",
    show_default=True,
    help="How long each CRL is valid (nextUpdate - thisUpdate).",
)
@click.option("--watch", is_flag=True, help="Keep publishing every --interval until interrupted.")
@click.option("--interval", type=DURATION, default="5m", show_default=True)
@pass_state
def crl_publish(state: State, directory: Path | None, validity: timedelta, watch: bool, interval: timedelta) -> None:
    """Build and atomically publish a full CRL for every active CA."""
    if watch and interval >= validity:
        raise click.BadParameter("--interval must be shorter than --next-update", param_hint="--interval")
    pki = state.pki()
    target = directory or pki.config.home / "pki"
    while True:
        with pki.store.session() as session:
            for published in publish_all(session, pki.token(), target, validity=validity):
                outcome = "published" if published.replaced else "kept newer"
                click.echo(f"{outcome} {published.path} (CRL number {published.number}, {published.entries} entries)")
        if not watch:
            return
        time.sleep(interval.total_seconds())
