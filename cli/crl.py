"""`chargepki crl publish`: one CRL per CA into the publication directory, once or on a timer."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import click

from ca.store import Store
from cli.common import State, pass_state
from cli.params import DURATION
from crl.publisher import DEFAULT_VALIDITY, publish_all, revocation_summary, status_counter

_POLL_SECONDS = 0.5  # a revocation reaches the published CRL within about a second


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
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: republish within a second of any revocation, and every --interval.",
)
@click.option("--interval", type=DURATION, default="5m", show_default=True)
@pass_state
def crl_publish(state: State, directory: Path | None, validity: timedelta, watch: bool, interval: timedelta) -> None:
    """Build and atomically publish a full CRL for every active CA."""
    if watch and interval >= validity:
        raise click.BadParameter("--interval must be shorter than --next-update", param_hint="--interval")
    pki = state.pki()
    target = directory or pki.config.home / "pki"
    counter: int | None = None
    summary: tuple[int, int, str | None] | None = None
    published_summary = summary
    due = 0.0
    # Polls read in autocommit: on SQLite they must not take the write lock twice a second.
    watcher = Store(pki.config.database_url, read_only=True) if watch else None
    try:
        while True:
            if watcher is not None:
                with watcher.session() as reader:
                    if (latest := status_counter(reader)) != counter:
                        counter, summary = latest, revocation_summary(reader)
            if watcher is None or summary != published_summary or time.monotonic() >= due:
                with pki.store.session() as session:
                    for published in publish_all(session, pki.token(), target, validity=validity):
                        outcome = "published" if published.replaced else "kept newer"
                        number, entries = published.number, published.entries
                        click.echo(f"{outcome} {published.path} (CRL number {number}, {entries} entries)")
                published_summary, due = summary, time.monotonic() + interval.total_seconds()
            if watcher is None:
                return
            time.sleep(_POLL_SECONDS)
    finally:
        if watcher is not None:
            watcher.dispose()
