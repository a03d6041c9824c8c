"""`chargepki token doctor`: the PKCS#11 token checked step by step (ca/keys/doctor.py)."""

from __future__ import annotations

import os

import click

from ca.config import load_config
from ca.issuance.profiles import key_types_in_use
from ca.keys.doctor import PROBLEM, WARNING, Finding, diagnose
from cli.common import State, emit_json, json_option, pass_state


def _show(finding: Finding) -> None:
    label = {PROBLEM: "PROBLEM", WARNING: "warning"}.get(finding.status, finding.status)
    click.echo(f"  {label:<8} {finding.check:<14} {finding.summary}")
    if finding.explanation:
        click.echo(f"  {'':<8} {'':<14} {finding.explanation}")
    if finding.remedy:
        click.echo(f"  {'':<8} {'':<14} check: {finding.remedy}")


@click.command("doctor")
@json_option
@pass_state
def token_doctor(state: State, as_json: bool) -> None:
    """Check the PKCS#11 token (not the one-time secrets) step by step, saying what to fix.

    \b
    config       module path, token label, where the PIN comes from (never the PIN)
    module       the module loads and initialises
    slots        the slots and the tokens in them
    token        label, manufacturer, model, serial, flags (PIN locked, final try …)
    login        a login with the configured PIN (one attempt)
    mechanisms   key generation and signing mechanisms for every key type of the profiles
    leftover_keys  temporary keys an interrupted earlier run left behind
    sign_verify  per key type, a temporary key pair generated in the token, a signature of
                 each kind the CA makes (ECDSA; RSA PKCS#1 v1.5 and PSS) verified, the key
                 destroyed, failed or not, and looked for again

    Each PKCS#11 error (CKR_PIN_INCORRECT, CKR_TOKEN_NOT_PRESENT …) is explained in plain words with
    what to check. Exit status 0 when no check found a problem (warnings allowed), 1 otherwise. Every
    run with a wrong PIN counts against the token's PIN retry limit.
    """
    config = load_config(state.home, os.environ)
    settings = config.pkcs11
    if not as_json:
        where = config.config_path if config.config_path.exists() else f"{config.home} (no config file: defaults)"
        click.echo(f"token doctor: token {settings.token_label!r} through {settings.module}, config {where}")
    findings = []
    for finding in diagnose(settings, os.environ, key_types=key_types_in_use()):
        findings.append(finding)
        if not as_json:
            _show(finding)
    problems = sum(1 for finding in findings if finding.status == PROBLEM)
    if as_json:
        emit_json(
            {
                "ok": problems == 0,
                "module": settings.module,
                "token_label": settings.token_label,
                "problems": problems,
                "checks": [finding.as_dict() for finding in findings],
            }
        )
    elif problems:
        click.echo(f"token doctor: {problems} problem(s)")
    else:
        click.echo("token doctor: the token is ready for every key type the profiles use")
    if problems:
        raise click.exceptions.Exit(1)
