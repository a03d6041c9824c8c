"""`chargepki ocsp …` (refresher, signer rotation, the on-demand signer) and `chargepki serve ocsp`."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from ca.frontdoor import die_with_parent
from cli.common import State, actor, pass_state
from cli.enrollment import DIRECT_HELP, front_door_enabled, serve
from cli.params import DURATION
from metrics.listener import exporting
from ocsp.presign import Presigner, policy_from, refresh, rotate_signers
from ocsp.server import (
    maintain,
    run_signer,
    serve_responder,
    serve_responder_front_door,
    signer_alive,
    wait_for_signer,
)
from ocsp.wsgi import signer_socket_path


@click.group()
def ocsp() -> None:
    """OCSP responses: pre-signing, refreshing and signer rotation (RFC 6960 / RFC 5019)."""


@ocsp.command("refresh")
@click.option("--watch", is_flag=True, help="Keep refreshing every --interval until interrupted.")
@click.option("--interval", type=DURATION, help="Pause between passes (default: ocsp.refresh_interval_seconds).")
@pass_state
def ocsp_refresh(state: State, watch: bool, interval: timedelta | None) -> None:
    """Re-sign every response past half its validity (and any missing), rotating signers that are due."""
    pki = state.pki()
    presigner = state.status()
    pause = interval.total_seconds() if interval else pki.config.ocsp.refresh_interval_seconds
    while True:
        rotated, signed = maintain(pki, presigner, actor=actor())
        click.echo(f"{rotated} signer(s) rotated, {signed} response(s) signed")
        if not watch:
            return
        time.sleep(pause)


@ocsp.command("rotate-signer")
@click.option("--ca", "ca_names", multiple=True, help="Only this CA (repeatable; default: every CA).")
@pass_state
def ocsp_rotate_signer(state: State, ca_names: tuple[str, ...]) -> None:
    """Issue a new delegated OCSP signer now and re-sign the CA's responses with it."""
    pki = state.pki()
    presigner: Presigner = state.status()
    now = datetime.now(UTC)
    with pki.store.session() as session:
        rotated = rotate_signers(
            session,
            presigner,
            actor=actor(),
            now=now,
            validity=timedelta(days=pki.config.ocsp.signer_validity_days),
            force=True,
            authority_names=ca_names,
        )
        for authority, row in rotated:
            until = f"{row.not_after:%Y-%m-%d}"
            click.echo(f"[{authority.environment}] {authority.name}: new OCSP signer {row.serial} until {until}")
        signed = refresh(session, presigner, now)
    click.echo(f"{signed} response(s) re-signed")


@ocsp.command("signer")
@pass_state
def ocsp_signer(state: State) -> None:
    """Run the on-demand signer and refresher (started by `serve ocsp`; holds the token)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pki = state.pki()
    policy_from(pki.config.ocsp)  # fail fast on a bad [ocsp] table
    run_signer(pki)


@serve.command("ocsp")
@click.option("--host", help="Listen address (default: ocsp.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: ocsp.port, 8081).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: ocsp.workers).")
@click.option("--server", type=click.Choice(["granian", "gunicorn"]), help="HTTP server (default: ocsp.server).")
@click.option("--no-signer", is_flag=True, help="Answer from stored responses only; never start the signer.")
@click.option("--direct", is_flag=True, help=DIRECT_HELP)
@click.option("--unix-socket", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@pass_state
def serve_ocsp(
    state: State,
    host: str | None,
    port: int | None,
    workers: int | None,
    server: str | None,
    no_signer: bool,
    direct: bool,
    unix_socket: Path | None,
) -> None:
    """The keyless OCSP responder over HTTP (behind nginx unless --direct), plus the on-demand signer
    process unless one is running."""
    pki = state.pki()
    config = pki.config
    settings = config.ocsp
    host = host or settings.host
    port = port if port is not None else settings.port
    workers = workers or settings.workers
    server = server or settings.server
    proxied = unix_socket is None and front_door_enabled(pki, direct)
    signer = None
    socket_path = signer_socket_path(config)
    metrics = contextlib.ExitStack()
    if unix_socket is None:  # the workers' and the signer's metrics directory, and the listener (keyless)
        metrics.enter_context(exporting(config, "ocsp", pki.environ))
    if not no_signer and not signer_alive(socket_path):
        command = [sys.executable, "-m", "cli.main", "--home", str(config.home), "ocsp", "signer"]
        signer = subprocess.Popen(command, preexec_fn=die_with_parent)
        if not wait_for_signer(socket_path, lambda: signer.poll() is None):
            signer.terminate()
            metrics.close()
            raise click.ClickException(f"the on-demand OCSP signer did not start (socket {socket_path})")
    pki.close()
    if unix_socket is None:
        bound = f"http://{host}:{port}{settings.path}"
        front = " behind nginx" if proxied else ""
        click.echo(f"OCSP: {bound}{front} (repository {settings.repository_path}/)", err=True)
    try:
        if proxied:
            watched = {"signer": lambda: signer.poll() is None} if signer is not None else {}
            serve_responder_front_door(
                config,
                dict(pki.environ),
                host=host,
                port=port,
                workers=workers,
                server=server,
                signer=not no_signer,
                alive=watched,
            )
        else:
            serve_responder(
                config,
                host=host,
                port=port,
                workers=workers,
                server=server,
                signer=not no_signer,
                unix_socket=unix_socket,
            )
    finally:
        if signer is not None:
            signer.terminate()
            signer.wait(10)
        metrics.close()
