"""Write docs/cli.md from the click commands' own help, so the CLI reference cannot drift.

    .venv/bin/python tools/cli_reference.py          # rewrite docs/cli.md
    .venv/bin/python tools/cli_reference.py --check  # exit 1 if docs/cli.md is out of date

tests/test_docs.py runs the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "cli.md"
WIDTH = 100

HEADER = """\
# CLI reference

Generated from the commands' own `--help` by `tools/cli_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this file and the code disagree). Rerun
`.venv/bin/python tools/cli_reference.py` after changing a command.

Every command acts on one home directory: `--home DIR`, else `$CHARGEPKI_HOME`, else `./var`
(`make` sets `CHARGEPKI_HOME=$PWD/var`). To use the CLI from a checkout:

```sh
. .venv/bin/activate
export CHARGEPKI_HOME=$PWD/var
```

Conventions shared by every command:

- **Serials** are printed in upper-case hex without leading zeros (as OCPP writes them) and
  accepted in any case, with or without `0x` or colons.
- **Revocation reasons** are RFC 5280's names (`unspecified`, `keyCompromise`, `cACompromise`,
  `affiliationChanged`, `superseded`, `cessationOfOperation`, `certificateHold`,
  `privilegeWithdrawn`, `aACompromise`), also written `key-compromise` or `KEY_COMPROMISE`. A
  hold can be released (`unhold`) or made permanent (a second `revoke` keeps the hold's time).
- **Durations** are a number of days, hours or minutes: `90d`, `23h`, `30m` (a bare number
  means days; at most 36,500 days).
- Commands that act on a CA print `[environment] CA name` on stderr, so stdout stays clean PEM.
- **Errors** are one line on stderr (`Error: …`) with exit status 1 (2 for usage errors), never
  a traceback (`CHARGEPKI_DEBUG=1` re-raises unexpected ones for developers).
- **Machine-readable output**: `--json` on every list, show, status and verify command (and
  `--format json` on the reports) prints one JSON document on stdout and nothing else; its fields
  and the exit statuses are in [cli-json.md](cli-json.md).
- There is deliberately no `--pin` option (command-line arguments show in `ps`): the PIN comes
  from the environment or a 0600 file, see [operations.md](operations.md#configuration).

Which guide explains each group: `init`, `issue`, `ca`, `cert`, `revoke`, `unhold`:
[certificates.md](certificates.md) and [rotation.md](rotation.md); `device`, `token`, `ra`,
`serve est`: [est.md](est.md); `csms`: [csms-api.md](csms-api.md); `crl`, `ocsp`, `serve ocsp`:
[revocation.md](revocation.md); `v2g`: [v2g.md](v2g.md); `manufacturer`, `firmware`:
[firmware.md](firmware.md); `campaign`, `ca rotate`, `ca rollover-root`: [rotation.md](rotation.md);
`audit`: [audit.md](audit.md); `run`, `db`, `report`, `token doctor`: [operations.md](operations.md).
"""


def _contexts(ctx: click.Context) -> list[click.Context]:
    """The context of every command, each a child of its group's (as in a real invocation, so the
    group's settings such as ``-h`` reach the subcommands)."""
    found = [ctx]
    command = ctx.command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found += _contexts(click.Context(sub, info_name=name, parent=ctx, **sub.context_settings))
    return found


def render() -> str:
    from cli.main import cli

    root = click.Context(
        cli, info_name="chargepki", terminal_width=WIDTH, max_content_width=WIDTH, **cli.context_settings
    )
    contexts = _contexts(root)
    parts = [HEADER, "## Commands\n"]
    parts += [f"- [`{ctx.command_path}`](#{ctx.command_path.replace(' ', '-')})" for ctx in contexts]
    parts.append("")
    for ctx in contexts:
        parts += [f"## {ctx.command_path}\n", "```", ctx.command.get_help(ctx).rstrip(), "```\n"]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run .venv/bin/python tools/cli_reference.py")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
