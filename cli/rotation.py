"""`chargepki ca rotate`, `chargepki ca rollover-root` and `chargepki campaign …` (key rotation)."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from ca.authorities.rotation import last_expiry, latest_rollover, rollover_files, rollover_root, rotate_issuing_ca
from ca.clock import iso_utc
from ca.errors import InputError
from ca.issuance.names import ENVIRONMENTS
from ca.keys.keyspec import ALL_KEY_TYPES
from ca.registry.campaigns import STATES, Progress, get_campaign, list_campaigns, progress, start_campaign
from ca.store.models import Campaign
from ca.work import Work
from cli.common import State, actor, emit_json, fmt_time, json_option, note, pass_state, table
from cli.params import DURATION


def _refresh_client_bundle(state: State) -> None:
    """A local `serve est` trusts the new CA's devices from its next connection (see web/server.py)."""
    from web.server import client_ca_bundle_path, write_client_ca_bundle

    pki = state.pki()
    path = client_ca_bundle_path(pki)
    if path.parent.is_dir():
        with pki.store.session() as session:
            write_client_ca_bundle(session, path)
        click.echo(f"updated {path}; EST servers of other homes need a restart to trust the new CA", err=True)


@click.command("rotate")
@click.option("--ca", "ca_name", help="The issuing CA to rotate (default: the environment's newest).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--validity", type=DURATION, help="Validity of the new CA, e.g. 3650d (default: the profile's).")
@pass_state
def ca_rotate(state: State, ca_name: str | None, environment: str | None, validity: timedelta | None) -> None:
    """A new issuing CA (key in the token) under the same root; new enrollments use it at once.

    The old CA keeps signing its CRL and OCSP responses until its last certificate expires, then retires.
    """
    pki = state.pki()
    with pki.store.session() as session:
        result = rotate_issuing_ca(state.work(session), ca_name=ca_name, environment=environment, validity=validity)
        note(result.issuing)
        previous, issuing = result.previous, result.issuing
        until = last_expiry(session, previous)
        click.echo(f"rotated {previous.name} -> {issuing.name}: {issuing.subject}")
        click.echo(f"  valid until {fmt_time(issuing.not_after)}, OCSP signer {result.ocsp_signer.serial}")
        if until is None:
            click.echo(f"  {previous.name} has no certificate to answer for: the refresher retires it within hours")
        else:
            click.echo(
                f"  {previous.name} keeps signing its CRL and OCSP responses until its last certificate expires "
                f"({fmt_time(until)}), then retires"
            )
        click.echo(f"  move the fleet now: chargepki campaign start --from-ca {previous.name}")
    _refresh_client_bundle(state)


@click.command("rollover-root")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the InstallCertificate payloads (default: <home>/rollover/<new root>).",
)
@click.option("--key-type", type=click.Choice(ALL_KEY_TYPES), help="Key type of the new CAs (default: as before).")
@click.option("--validity", type=DURATION, help="Validity of the new root (default: the profile's).")
@click.option("--export-only", is_flag=True, help="Write the files of the latest rollover again; create nothing.")
@pass_state
def ca_rollover_root(
    state: State,
    environment: str | None,
    out: Path | None,
    key_type: str | None,
    validity: timedelta | None,
    export_only: bool,
) -> None:
    """A new root, its link certificates and a new issuing CA, plus what the CSMS pushes to chargers.

    Follows OCPP 2.0.1's AdditionalRootCertificateCheck: the new root is first installed as a
    certificate signed by the old root (NewWithOld). See README.txt in the output directory.
    """
    if export_only and (key_type or validity):
        raise InputError("--export-only creates nothing: drop --key-type and --validity")
    pki = state.pki()
    with pki.store.session() as session:
        if export_only:
            result = latest_rollover(session, environment)
        else:
            result = rollover_root(
                state.work(session), environment=environment, key_type=key_type, root_validity=validity
            )
        note(result.new_root)
        files = rollover_files(session, result)
        target = out or pki.config.home / "rollover" / result.new_root.name
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (target / name).write_bytes(data)
        except OSError as exc:
            raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
        if not export_only:
            click.echo(f"new root {result.new_root.name}: {result.new_root.subject}")
            click.echo(f"new issuing CA {result.issuing.name} (new enrollments use it at once)")
            click.echo(
                f"link certificates: NewWithOld {result.new_with_old.serial} (by {result.old_root.name}), "
                f"OldWithNew {result.old_with_new.serial} (by {result.new_root.name})"
            )
        click.echo(f"wrote {len(files)} files to {target}; push them in order:")
        for name in sorted(n for n in files if n[:2].isdigit()):
            click.echo(f"  {name}")
        click.echo(f"  (the steps in between: {target / 'README.txt'})")
    if not export_only:
        _refresh_client_bundle(state)


# -- campaigns ------------------------------------------------------------------------------------
@click.group()
def campaign() -> None:
    """Fleet re-enrollment campaigns after `ca rotate` / `ca rollover-root`."""


@campaign.command("start")
@click.option("--from-ca", "from_ca", required=True, help="The superseded issuing CA whose devices must move.")
@pass_state
def campaign_start(state: State, from_ca: str) -> None:
    """Track every device holding a certificate from FROM_CA until it re-enrolls onto the newest CA.

    The devices move through their normal renewals (EST simplereenroll, the CSMS's SignCertificate).
    """
    with state.pki().store.session() as session:
        started, size = start_campaign(Work(session, actor()), from_ca=from_ca)
        note(started.from_authority)
        click.echo(
            f"campaign {started.id}: {size} device(s) to move from {started.from_authority.name} "
            f"to {started.to_authority.name}"
        )


def _show_counts(result: Progress) -> None:
    for state in STATES:
        click.echo(f"{state.replace('reenrolled', 're-enrolled'):<12} {result.count(state)}")


@campaign.command("status")
@click.option("--id", "campaign_id", type=int, help="Campaign number (default: the newest).")
@click.option("--from-ca", "from_ca", help="The campaign moving devices off this CA.")
@click.option("--show", type=click.Choice(STATES), help="Also list the devices in this state, with the reason.")
@click.option("--watch", is_flag=True, help="Keep the progress bar moving until no device is pending.")
@click.option("--interval", type=DURATION, default="1m", show_default=True)
@json_option
@pass_state
def campaign_status(
    state: State,
    campaign_id: int | None,
    from_ca: str | None,
    show: str | None,
    watch: bool,
    interval: timedelta,
    as_json: bool,
) -> None:
    """Progress: devices re-enrolled onto the new CA, still pending, failed (with --show, which and why).

    With --json, every device and its state (only those in the --show state, if given).
    """
    if as_json and watch:
        raise click.UsageError("--watch redraws a progress bar; --json prints the progress once")
    with state.pki().store.session() as session:
        selected = get_campaign(session, campaign_id, from_ca)
        if as_json:
            result = progress(session, selected)
            emit_json(
                {
                    **_campaign(selected, result.total),
                    **{name: result.count(name) for name in STATES},
                    "device_states": [
                        {"device": d.serial, "state": d.state, "detail": d.detail}
                        for d in result.devices
                        if show is None or d.state == show
                    ],
                }
            )
            return
        note(selected.from_authority)
        click.echo(
            f"campaign {selected.id}: {selected.from_authority.name} -> {selected.to_authority.name}, "
            f"started {fmt_time(selected.started_at)}"
        )
        result = progress(session, selected)
        if not result.total:
            click.echo(f"no device held a current certificate from {selected.from_authority.name}")
        else:
            with click.progressbar(length=result.total, label="re-enrolled", show_pos=True, file=sys.stderr) as bar:
                done = result.count("reenrolled")
                bar.update(done)
                while watch and result.count("pending"):
                    time.sleep(interval.total_seconds())
                    result = progress(session, selected)
                    bar.length = result.total  # late joiners (see ca/campaigns.py)
                    bar.update(result.count("reenrolled") - done)
                    done = result.count("reenrolled")
        _show_counts(result)
        if show:
            table(
                ["DEVICE", "STATE", "DETAIL"],
                [[d.serial, d.state, d.detail] for d in result.devices if d.state == show],
            )


def _campaign(selected: Campaign, devices: int) -> dict[str, Any]:
    return {
        "id": selected.id,
        "environment": selected.environment,
        "from_ca": selected.from_authority.name,
        "to_ca": selected.to_authority.name,
        "started_at": iso_utc(selected.started_at),
        "started_by": selected.actor,
        "devices": devices,
    }


@campaign.command("list")
@json_option
@pass_state
def campaign_list(state: State, as_json: bool) -> None:
    """Every campaign, newest first."""
    with state.pki().store.session() as session:
        if as_json:
            emit_json({"campaigns": [_campaign(c, size) for c, size in list_campaigns(session)]})
            return
        rows = [
            [
                str(c.id),
                c.environment,
                c.from_authority.name,
                c.to_authority.name,
                fmt_time(c.started_at),
                str(size),
            ]
            for c, size in list_campaigns(session)
        ]
    table(["ID", "ENVIRONMENT", "FROM", "TO", "STARTED", "DEVICES"], rows)
