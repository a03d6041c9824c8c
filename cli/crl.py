"""`chargepki crl publish`: one CRL per CA into the publication directory, once or on a timer."""

from __future__ import annotations

import shlex
import subprocess
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ca.audit.checkpoints import CheckpointTimer
from ca.errors import ChargepkiError
from ca.store.engine import Store
from cli.common import State, pass_state
from cli.params import DURATION
from crl.leader import Lease, NotLeader, holder_name
from crl.publisher import DEFAULT_VALIDITY, publish_all, revocation_summary, status_counter
from metrics.listener import serve_publisher

_POLL_SECONDS = 0.5  # a revocation reaches the published CRL within about a second
_RETRY_SECONDS = 5.0


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
    help="Keep running: republish within a second of any revocation, and every --interval; "
    "sign audit checkpoints every [audit] checkpoint_interval_seconds. Several watching publishers "
    "(one per host) elect one writer through a lease in the database ([crl] leader_lease_seconds).",
)
@click.option("--interval", type=DURATION, default="5m", show_default=True)
@click.option(
    "--on-change",
    metavar="COMMAND",
    help="Run COMMAND (no shell) after new CRLs were written, e.g. 'nginx -s reload' for ssl_crl.",
)
@pass_state
def crl_publish(
    state: State, directory: Path | None, validity: timedelta, watch: bool, interval: timedelta, on_change: str | None
) -> None:
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
    watcher = Store(pki.config.database_url, read_only=True, settings=pki.config.database) if watch else None
    # A long-running publisher also signs the audit chain's periodic checkpoints (one per interval
    # across every process that does, ca/checkpoints.py).
    every = timedelta(seconds=pki.config.audit.checkpoint_interval_seconds)
    checkpoint_timer = CheckpointTimer(every, name="CRL publisher") if watch else None
    # A watching publisher serves its metrics (published CRLs, token, signatures) from a thread of its own.
    listener = serve_publisher(pki.config, target, pki.token) if watch else None
    # Several watching publishers (one per host) elect one writer through a lease in the database.
    lease = Lease(holder_name(), pki.config.crl.leader_lease_seconds) if watch else None
    leading: bool | None = None  # not known yet: the first look is reported either way
    try:
        while True:
            if lease is not None and watcher is not None and _lead(pki.store, watcher, lease) != leading:
                leading = not leading
                if leading:
                    click.echo(f"leading: this publisher writes the CRLs (lease term {lease.term})")
                    due, published_summary = 0.0, None  # publish at once: the last leader may have missed some
                else:
                    click.echo("following: another publisher holds the CRL writer lease")
            if watcher is not None and leading:
                try:
                    with watcher.session() as reader:
                        if (latest := status_counter(reader)) != counter:
                            counter, summary = latest, revocation_summary(reader)
                except OperationalError as exc:
                    click.echo(f"cannot read the database, retrying: {str(exc.orig).strip()[:200]}", err=True)
                    time.sleep(_RETRY_SECONDS)
                    continue
            if watcher is None or (leading and (summary != published_summary or time.monotonic() >= due)):
                try:
                    with pki.store.session() as session:
                        results = publish_all(session, pki.token(), target, validity=validity, lease=lease)
                except NotLeader as exc:
                    click.echo(f"publication stopped: {exc}", err=True)
                    if lease is not None:
                        lease.drop()
                    continue
                except (ChargepkiError, OperationalError) as exc:
                    if watcher is None:
                        raise
                    # A watching publisher outlives a full disk, an absent token or a database
                    # restart: the previous CRLs stay in place and it tries again shortly.
                    click.echo(f"publication failed, retrying in {_RETRY_SECONDS:g} s: {exc}", err=True)
                    time.sleep(_RETRY_SECONDS)
                    continue
                for published in results:
                    outcome = "published" if published.replaced else "kept newer"
                    number, entries = published.number, published.entries
                    click.echo(f"{outcome} {published.path} (CRL number {number}, {entries} entries)")
                if on_change and any(published.replaced for published in results):
                    _run_hook(on_change)
                published_summary, due = summary, time.monotonic() + interval.total_seconds()
            if watcher is None:
                return
            if checkpoint_timer is not None and checkpoint_timer.due():
                with pki.store.session() as session:
                    if (made := checkpoint_timer.run(session, pki.token, pki.config.home)) is not None:
                        click.echo(f"audit checkpoint at entry {made.seq}")
            time.sleep(_POLL_SECONDS)
    finally:
        if lease is not None and lease.held():
            with suppress(SQLAlchemyError), pki.store.session() as session:
                lease.release(session)  # a follower takes over at once
        if listener is not None:
            listener.shutdown()
        if watcher is not None:
            watcher.dispose()


def _lead(store: Store, watcher: Store, lease: Lease) -> bool:
    """Renew the lease when leading (every third of it), else look at it every ``crl.leader.FOLLOWER_CHECK``
    seconds and claim it when it is free. Whether this publisher leads now: a leader that cannot
    reach the database leads until its own deadline, never longer."""
    if not lease.renewal_due():
        return True
    if not lease.held() and not lease.look_due():
        return False
    try:
        if not lease.held():
            with watcher.session() as reader:  # a read first: followers never queue for the write lock
                if not lease.free(reader):
                    return False
        with store.session() as session:
            lease.claim(session)
    except SQLAlchemyError as exc:
        click.echo(f"cannot reach the CRL writer lease: {str(exc).strip().splitlines()[0][:200]}", err=True)
    return lease.held()


def _run_hook(command: str) -> None:
    """Run the operator's hook; a failing hook is reported and never stops the publisher."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        click.echo(f"--on-change command failed: {exc}", err=True)
        return
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        click.echo(f"--on-change command exited {done.returncode}: {last[0]}", err=True)
