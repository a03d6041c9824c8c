"""CRL of N revoked entries: chargepki next to `openssl ca -gencrl` on the same entries.

A temporary chargepki home (SQLite, SoftHSM2 token, EC P-256 hierarchy) gets N revoked rows for
its issuing CA by bulk insert: random 159-bit serials, revocation times over the last two years,
a third with a reason (keyCompromise ones partly with an invalidity date), the rest without. The
rows are not real certificates signed by the CA (the CRL does not need them to be). openssl gets
an `openssl ca` directory whose index.txt holds the same serials, times and reasons (its
certificateHold entries need a hold instruction: holdInstructionNone) and a throwaway software
EC P-256 key: openssl is only the peer, chargepki's CA key stays in the token. Measured:

- chargepki crl publish: the CLI process, end to end (start-up, token login, DB read, build,
  token signature, verification, atomic write; the root's small CRL too), under /usr/bin/time -v
- build + sign: `crl.builder.build` in a process of its own on rows already read (time and the
  process's peak RSS, which includes those rows)
- cryptography's builder (the code before): RevokedCertificate objects, CertificateRevocationListBuilder
- openssl ca -gencrl under /usr/bin/time -v (writes PEM, its only output format)

    .venv/bin/python bench/crl.py [--sizes 100000,1000000] [--out bench/results-crl.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import machine  # noqa: E402
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.authorities.issuers import get_authority, issuer_for  # noqa: E402
from ca.config import embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.issuance.serials import new_serial  # noqa: E402
from ca.store.models import Certificate  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.presign import Presigner, policy_from  # noqa: E402

ORG = "Bench Charging"
CA_NAME = "production-issuing-1"
REASONS = ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged", "certificateHold"]
OPENSSL_REASON = {"cACompromise": "CACompromise"}  # index.txt spells this one differently


@dataclass
class Measure:
    seconds: float
    peak_mb: float
    crl_bytes: int = 0
    before_mb: float | None = None  # RSS when the timed part started (in-process runs: the rows already read)


def environ() -> dict[str, str]:
    """The caller's environment without its chargepki settings, and with Python's bytecode cache
    on, as on an operator's machine (this development sandbox sets PYTHONDONTWRITEBYTECODE, which
    made every CLI process compile the project's modules again: ~0.12 s of its start-up)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_") and k != "PYTHONDONTWRITEBYTECODE"}


def make_home(work: Path) -> Path:
    home = work / "home"
    write_config(embedded_defaults(home))
    pki = Pki.open(home, environ(), create=True)
    with pki.store.session() as session:
        status = Presigner(pki.token(), policy_from(pki.config.ocsp))
        init_hierarchy(
            Work(session=session, actor="bench", status=status, token=pki.token()),
            request=HierarchyRequest(organization=ORG),
        )
    pki.close()
    return home


def entries(count: int, now: datetime) -> list[tuple[int, datetime, str | None, datetime | None]]:
    """Realistic rows: distinct 159-bit serials, times with microseconds, a third with a reason."""
    rng = random.Random(count)
    serials: set[int] = set()
    while len(serials) < count:
        serials.add(new_serial())
    rows = []
    for serial in serials:
        revoked_at = now - timedelta(seconds=rng.randrange(1, 2 * 365 * 86400), microseconds=rng.randrange(10**6))
        reason = REASONS[rng.randrange(len(REASONS))] if rng.random() < 1 / 3 else None
        invalidity = None
        if reason == "keyCompromise" and rng.random() < 0.5:
            invalidity = (revoked_at - timedelta(days=rng.randrange(1, 30))).replace(microsecond=0)
        rows.append((serial, revoked_at, reason, invalidity))
    return rows


def insert(home: Path, rows: list[tuple[int, datetime, str | None, datetime | None]], now: datetime) -> float:
    """Bulk Core INSERT of the rows as revoked certificates of the issuing CA (after clearing the last size's)."""
    from sqlalchemy import delete, insert

    pki = Pki.open(home, environ())
    table = Certificate.__table__
    started = time.perf_counter()
    with pki.store.session() as session:
        authority = get_authority(session, CA_NAME)
        session.execute(delete(table).where(table.c.profile == "bench"))
        not_after = now + timedelta(days=365)
        batch = 50_000
        for start in range(0, len(rows), batch):
            session.execute(
                insert(table),
                [
                    {
                        "serial": format(serial, "X"),
                        "authority_id": authority.id,
                        "profile": "bench",
                        "status": "revoked",
                        "subject": f"CN=CP-{index:07d},O={ORG}",
                        "not_before": revoked_at - timedelta(days=30),
                        "not_after": not_after,
                        "public_key_sha256": "0" * 64,
                        "revoked_at": revoked_at,
                        "revocation_reason": reason,
                        "invalidity_date": invalidity,
                        "created_at": revoked_at,
                    }
                    for index, (serial, revoked_at, reason, invalidity) in enumerate(rows[start : start + batch], start)
                ],
            )
        session.commit()
    pki.close()
    return time.perf_counter() - started


def timed(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[Measure, str]:
    """Wall time (measured here) and peak RSS (from GNU time -v) of a command."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    assert rss, result.stderr
    return Measure(seconds, int(rss.group(1)) / 1024), result.stdout


# -- chargepki ---------------------------------------------------------------------------------------
def chargepki_publish(home: Path, count: int) -> Measure:
    """`chargepki crl publish` as an operator runs it (0 entries: the fixed cost of the process)."""
    command = [sys.executable, "-c", "from cli.main import main; main()", "--home", str(home), "crl", "publish"]
    measure, output = timed(command, ROOT, environ())
    assert f"{CA_NAME}.crl (CRL number" in output and f", {count} entries)" in output, output
    crl = home / "pki" / f"{CA_NAME}.crl"
    assert len(x509.load_der_x509_crl(crl.read_bytes())) == count
    measure.crl_bytes = crl.stat().st_size
    return measure


def in_process(home: Path, mode: str) -> Measure:
    """Run ``measure(mode)`` below in a fresh interpreter, so its peak RSS is its own."""
    command = [sys.executable, __file__, "--measure", mode, "--home", str(home)]
    result = subprocess.run(command, cwd=ROOT, env=environ(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed: {result.stderr[-2000:]}")
    return Measure(**json.loads(result.stdout.strip().splitlines()[-1]))


def _moment(stored: str) -> datetime:
    """The publisher hands revocation times over as the store keeps them (SQLite's text
    ``YYYY-MM-DD HH:MM:SS.ffffff``) or as the DER's 14 digits (PostgreSQL's ``to_char``), UTC."""
    digits = stored[:19].translate(str.maketrans("", "", "-: T"))
    return datetime.strptime(digits, "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def measure(mode: str, home: Path) -> Measure:
    """In the child: read the rows (not timed), then time building and signing the CRL."""
    from crl.builder import RevokedEntry, build
    from crl.publisher import revoked_rows

    pki = Pki.open(home, environ())
    now = datetime.now(UTC).replace(microsecond=0)
    with pki.store.session() as session:
        authority = get_authority(session, CA_NAME)
        issuer = issuer_for(authority, pki.token())
        rows = list(revoked_rows(session, authority, now))
        issuer.sign_tbs(b"warm-up")  # token session and key handle, as the CLI has them before it signs
    if mode == "cryptography":  # the entry objects the code before this module made from the same rows
        rows = [RevokedEntry(int(s, 16), _moment(r), reason, i and _moment(i)) for s, r, reason, i in rows]
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    started = time.perf_counter()
    if mode == "build":
        der, count = build(issuer, rows, this_update=now, next_update=now + timedelta(days=7), number=1)
    else:
        der, count = cryptography_build(issuer, rows, now)
    seconds = time.perf_counter() - started
    assert count == len(rows) and len(x509.load_der_x509_crl(der)) == count
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pki.close()
    return Measure(seconds, peak, len(der), before)


def cryptography_build(issuer, rows, now: datetime) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """What crl/builder.py did before: one RevokedCertificate per entry, the whole list to the builder."""
    from ca.status.revocation import REASONS as FLAGS

    revoked = []
    for serial, revoked_at, reason, invalidity in rows:
        extensions: list[x509.Extension[x509.ExtensionType]] = []
        if reason is not None and reason != "unspecified":
            value = x509.CRLReason(FLAGS[reason])
            extensions.append(x509.Extension(value.oid, False, value))
        if invalidity is not None:
            date = x509.InvalidityDate(invalidity.replace(tzinfo=None))
            extensions.append(x509.Extension(date.oid, False, date))
        revoked.append(x509.RevokedCertificateBuilder(serial, revoked_at, extensions).build())
    assert issuer.certificate is not None
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    number = x509.CRLNumber(1)
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.certificate.subject,
        last_update=now,
        next_update=now + timedelta(days=7),
        extensions=[x509.Extension(aki.oid, False, aki), x509.Extension(number.oid, False, number)],
        revoked_certificates=revoked,
    )
    return issuer.sign_crl(builder), len(revoked)


# -- openssl -----------------------------------------------------------------------------------------
OPENSSL_CNF = """[ca]
default_ca = bench
[bench]
dir = .
database = $dir/index.txt
certificate = $dir/ca.pem
private_key = $dir/ca.key
crlnumber = $dir/crlnumber
default_md = sha256
default_crl_days = 7
unique_subject = no
crl_extensions = crl_ext
[crl_ext]
authorityKeyIdentifier = keyid:always
[req]
distinguished_name = dn
prompt = no
[dn]
O = Bench Charging
CN = Bench openssl CA
[v3_ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


def openssl_ca(work: Path) -> Path:
    directory = work / "openssl-ca"
    directory.mkdir(parents=True)
    (directory / "openssl.cnf").write_text(OPENSSL_CNF)
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-config",
            "openssl.cnf",
            "-key",
            "ca.key",
            "-days",
            "3650",
            "-extensions",
            "v3_ca",
            "-out",
            "ca.pem",
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return directory


def utc_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%y%m%d%H%M%SZ")


def write_index(directory: Path, rows: list[tuple[int, datetime, str | None, datetime | None]], now: datetime) -> None:
    """index.txt: R, expiry, "revocation[,reason[,compromise time | hold instruction]]", serial, file, subject."""
    expiry = utc_time(now + timedelta(days=365))
    lines = []
    for index, (serial, revoked_at, reason, invalidity) in enumerate(rows):
        revocation = utc_time(revoked_at)
        if reason is not None:
            revocation += "," + OPENSSL_REASON.get(reason, reason)
            if reason == "certificateHold":
                revocation += ",holdInstructionNone"
            elif invalidity is not None:
                revocation += "," + invalidity.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")
        hex_serial = format(serial, "X")
        hex_serial = "0" * (len(hex_serial) % 2) + hex_serial
        lines.append(f"R\t{expiry}\t{revocation}\t{hex_serial}\tunknown\t/O={ORG}/CN=CP-{index:07d}\n")
    (directory / "index.txt").write_text("".join(lines))
    (directory / "crlnumber").write_text("01\n")


def openssl_gencrl(directory: Path, count: int) -> Measure:
    measure, _ = timed(["openssl", "ca", "-gencrl", "-config", "openssl.cnf", "-out", "crl.pem"], directory)
    crl = x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())
    assert len(crl) == count, f"openssl listed {len(crl)} of {count}"
    measure.crl_bytes = len(crl.public_bytes(serialization_der()))
    return measure


def serialization_der():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER


# -- report ------------------------------------------------------------------------------------------
def machine_and_tools() -> str:
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return f"{machine()}, Python {platform.python_version()}, {openssl}"


def report(sizes: list[int], results: dict[int, dict[str, Measure]]) -> str:
    names = {
        "publish": "chargepki crl publish (CLI process: read SQLite, build, sign in SoftHSM2, verify, write)",
        "build": "chargepki build + sign (crl.builder.build, rows already read)",
        "cryptography": "cryptography's CertificateRevocationListBuilder (the code before), rows already read",
        "openssl": "openssl ca -gencrl (software key, PEM out)",
    }
    lines = [
        f"CRL with N revoked entries, EC P-256 CA, same entries for every row, one run on the same machine "
        f"({time.strftime('%Y-%m-%d')}): {machine_and_tools()}.",
        "",
        "The entries are bulk-inserted rows (random 159-bit serials, revocation times over two years, a third with "
        "a reason, half of the keyCompromise ones with an invalidity date), not certificates the CA signed. "
        "Peak MB is the process's maximum RSS, interpreter included; for the in-process rows, which time only "
        "building and signing, the RSS with the rows already read comes in brackets. The 0-entry publish is the "
        "fixed cost of the CLI process (start-up, imports, token login, the root's CRL; best of three).",
        "",
        "| what | N | seconds | µs/entry | peak MB | CRL bytes | vs openssl (time) |",
        "|---|---|---|---|---|---|---|",
    ]
    fixed = results[0]["publish"]
    lines.append(
        f"| {names['publish']} | 0 | {fixed.seconds:.2f} | – | {fixed.peak_mb:.0f} | {fixed.crl_bytes:,} | – |"
    )
    for size in sizes:
        baseline = results[size]["openssl"].seconds
        for key, name in names.items():
            m = results[size].get(key)
            if m is None:
                continue
            peak = f"{m.peak_mb:.0f}" + ("" if m.before_mb is None else f" ({m.before_mb:.0f})")
            lines.append(
                f"| {name} | {size:,} | {m.seconds:.2f} | {m.seconds / size * 1e6:.2f} | {peak} | "
                f"{m.crl_bytes:,} | {m.seconds / baseline:.2f}× |"
            )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        factor = large // small
        lines += ["", f"Time ratio {small:,} → {large:,} entries ({factor}× the entries, so linear is {factor}):", ""]
        for key, name in names.items():
            if key in results[small] and key in results[large]:
                ratio = results[large][key].seconds / results[small][key].seconds
                lines.append(f"- {name.split(' (')[0]}: {ratio:.1f}")
        small_net, large_net = (results[n]["publish"].seconds - fixed.seconds for n in (small, large))
        if small_net > 0:
            lines.append(
                f"- chargepki crl publish without its fixed cost (the 0-entry run): {large_net / small_net:.1f}"
            )
    lines += ["", "Reproduce: `make bench-crl` (or `.venv/bin/python bench/crl.py --sizes 100000,1000000`)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated entry counts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-crl.md")
    parser.add_argument("--skip-cryptography", action="store_true", help="leave out the old builder's row")
    parser.add_argument("--measure", choices=["build", "cryptography"], help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.home).__dict__))
        return 0
    if shutil.which("openssl") is None:
        print("openssl is missing (`make setup` installs it)", file=sys.stderr)
        return 1
    sizes = [int(size) for size in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chargepki-bench-crl-"))
    try:
        home = make_home(work)
        chargepki_publish(home, 0)  # warm-up: caches, the token's files
        fixed = min((chargepki_publish(home, 0) for _ in range(3)), key=lambda m: m.seconds)
        results: dict[int, dict[str, Measure]] = {0: {"publish": fixed}}
        for size in sizes:
            now = datetime.now(UTC)
            rows = entries(size, now)
            seconds = insert(home, rows, now)
            print(f"{size:,} entries: inserted in {seconds:.1f} s", file=sys.stderr)
            directory = openssl_ca(work / str(size))
            write_index(directory, rows, now)
            del rows
            results[size] = {"publish": chargepki_publish(home, size), "build": in_process(home, "build")}
            if not args.skip_cryptography:
                results[size]["cryptography"] = in_process(home, "cryptography")
            results[size]["openssl"] = openssl_gencrl(directory, size)
            for key, m in results[size].items():
                print(f"  {key}: {m.seconds:.2f} s, {m.peak_mb:.0f} MB", file=sys.stderr)
        table = report(sizes, results)
        print(table)
        args.out.write_text(table + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
