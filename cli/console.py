"""CLI for the read-only fleet console: admin certificates and one-time login links."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from ca.issuance.names import ENVIRONMENTS
from ca.registry.admins import check_admin_name, issue_login_link
from ca.work import Work
from cli.common import State, actor, pass_state
from cli.enrollment import issue_client_certificate
from cli.params import DURATION


@click.group()
def console() -> None:
    """The read-only fleet console (`serve console`): who may log in."""


@console.command("admin-cert")
@click.option("--name", required=True, help="The admin's name: the certificate's CN and the audit log's actor.")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@click.option("--csr", "csr_file", type=click.File("rb"), help="The admin's CSR, CN = NAME (else a key is made here).")
@click.option("--validity", type=DURATION, help="Default 90d, at most 365d.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), help="Whose issuing CA signs it.")
@click.option("--ca", "ca_name", help="Issuing CA (default: the environment's active one).")
@pass_state
def admin_cert(
    state: State, name: str, out_dir: Path, csr_file: Any, validity: timedelta | None, environment: str | None,
    ca_name: str | None,
) -> None:  # fmt: skip
    """Issue an admin client certificate: NAME.pem, and NAME.key (0600) when no CSR was given.

    Revoke it (`chargepki revoke SERIAL --reason …`) and the console refuses it on the next request.
    """
    check_admin_name(name)
    written = issue_client_certificate(
        state, "admin", name, csr_file=csr_file, out_dir=out_dir, validity=validity, environment=environment,
        ca_name=ca_name, what="admin",
    )  # fmt: skip
    click.echo(f"admin {name}: {written}")


@console.command("login-link")
@click.option("--name", required=True, help="Who logs in (the audit log's actor for the session).")
@pass_state
def login_link(state: State, name: str) -> None:
    """Print a one-time login link (usable once, for console.login_link_minutes; only its hash is kept)."""
    from web.console.server import console_url

    pki = state.pki()
    settings = pki.config.console
    with pki.store.session() as session:
        token = issue_login_link(Work(session, actor()), admin=name, ttl=timedelta(minutes=settings.login_link_minutes))
    click.echo(f"{console_url(pki, settings)}/login?token={quote(token)}")
