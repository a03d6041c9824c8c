"""The floor of one enrollment's CPU here: the parts no design with these guarantees can skip.

An enrollment that keeps chargepki's guarantees must at least verify the CSR's self-signature
(proof of possession), have the token sign the certificate and check that signature before
anyone sees it, have the token sign the certificate's OCSP response ahead and check it, and
make all of it durable with an fsync'd commit. Each part is measured alone, in this process,
with the real SoftHSM2 token and the functions the enrollment calls, as CPU time (user + system,
``time.process_time``: SoftHSM2 runs in this process), best of ``--rounds`` rounds:

- the token's ECDSA P-256 signature alone, one signature check alone (what the parts below are
  mostly made of), and for comparison a signature by a software key (``cryptography``), which is
  what a CA keeping its key in a file (cfssl) pays instead of the token's;
- ``read_csr``: parse the CSR and check its signature;
- the certificate: ``build_certificate`` and ``Issuer.sign`` (token signature, parsed back, checked);
- the OCSP response: ``ResponseSigner.sign`` (built, signed in the token, checked);
- durability: bare ``sqlite3`` (no SQLAlchemy), WAL and ``synchronous=FULL`` as the store sets
  them, one ``BEGIN IMMEDIATE`` … ``COMMIT`` writing a certificate-sized and a response-sized
  row; an enrollment has two write transactions, each shared by ``--group`` enrollments
  (group commit; ``bench/enroll_cpu.py`` reports the group sizes it reached).

The sum is what one enrollment costs before any SQL statement, HTTP, TLS or Python logic of the
pipeline; ``bench/enroll_cpu.py`` (the pipeline in-process) and ``bench/enroll.py`` (the whole
service) measure the rest. Unless ``--no-core``, ``bench/enroll_cpu.py --processes 2 --threads 8``
runs afterwards in the same run, so the two can be set side by side.

    .venv/bin/python bench/floor.py [--count 1000] [--rounds 5] [--group 6] [--no-core]
                                    [--out bench/results-floor.md]
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from bench.enroll import ORG, csrs  # noqa: E402
from bench.harness import machine  # noqa: E402
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.authorities.issuers import default_issuing_ca, issuer_for  # noqa: E402
from ca.config import Config, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.issuance.csr import read_csr  # noqa: E402
from ca.issuance.flow import build_certificate, request_from_csr, subject_name, validity_window  # noqa: E402
from ca.issuance.profiles import get_profile  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.certid import CertId  # noqa: E402
from ocsp.presign import Presigner  # noqa: E402
from ocsp.signing import SingleStatus  # noqa: E402


def best_cpu(rounds: int, count: int, one: Callable[[int], object]) -> float:
    """CPU seconds per call of ``one(index)``, the best of ``rounds`` rounds of ``count`` calls."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for index in range(count):
            one(index)
        best = min(best, (time.process_time() - started) / count)
    return best


def durable_commit(directory: Path, rounds: int, count: int) -> float:
    """CPU seconds of one fsync'd SQLite write transaction of two rows, with bare sqlite3."""
    connection = sqlite3.connect(directory / "floor.sqlite", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE certificates (id INTEGER PRIMARY KEY, serial TEXT UNIQUE, der BLOB)")
    connection.execute("CREATE TABLE responses (id INTEGER PRIMARY KEY, serial TEXT UNIQUE, der BLOB)")
    certificate, response = os.urandom(700), os.urandom(400)
    serials = iter(range(10**9))

    def transaction(_index: int) -> None:
        serial = f"{next(serials):040x}"
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO certificates (serial, der) VALUES (?, ?)", (serial, certificate))
        connection.execute("INSERT INTO responses (serial, der) VALUES (?, ?)", (serial, response))
        connection.execute("COMMIT")

    try:
        return best_cpu(rounds, count, transaction)
    finally:
        connection.close()


def core(count: int) -> str:
    """``bench/enroll_cpu.py``'s line for the pipeline in-process, 2 processes × 8 threads."""
    command = [sys.executable, str(ROOT / "bench" / "enroll_cpu.py"), "--count", str(count), "--processes", "2"]
    output = subprocess.run([*command, "--threads", "8"], capture_output=True, text=True, check=True).stdout
    return output.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--group", type=float, default=6.0, help="enrollments sharing one write transaction")
    parser.add_argument("--no-core", action="store_true", help="skip the in-process pipeline run afterwards")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-floor.md")
    args = parser.parse_args()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="chargepki-floor-") as scratch:
        work = Path(scratch)
        home = work / "home"
        defaults = embedded_defaults(home)
        write_config(Config(home=home, database_url=defaults.database_url, pkcs11=defaults.pkcs11))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
        pki = Pki.open(home, environ, create=True)
        try:
            token = pki.token()
            presigner = Presigner(token)
            with pki.store.session() as session:
                init_hierarchy(
                    Work(session=session, actor="bench", status=presigner, token=token),
                    request=HierarchyRequest(organization=ORG),
                )
                authority = default_issuing_ca(session, "production")
                issuer = issuer_for(authority, token)
                signer = presigner.signer_for(session, authority.id, datetime.now(UTC))
                assert signer is not None, "the hierarchy has an OCSP signer"
                issuer_hash = presigner.issuer_hashes(session, authority.id)["sha1"]
            ders = [
                csr.public_bytes(serialization.Encoding.DER) for csr in csrs([f"CP-{n:06d}" for n in range(args.count)])
            ]
            requests = [read_csr(der) for der in ders]
            profile = get_profile("charger")
            now = datetime.now(UTC)
            assert issuer.certificate is not None
            validity = validity_window(profile, None, now, issuer.certificate.not_valid_after_utc)
            data = b"x" * 300  # about a TBSCertificate's size
            token_key = issuer.private_key
            signature = token_key.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]
            public_key = issuer.public_key
            software_key = ec.generate_private_key(ec.SECP256R1())

            def certificate(index: int) -> x509.Certificate:
                request = request_from_csr(profile, requests[index], issuer)
                subject = subject_name(request.common_name, issuer.organization, issuer.country)
                builder = build_certificate(
                    profile, issuer, subject, request.public_key, 0x10000 + index, validity, request.dns_names
                )
                return issuer.sign(builder)

            def response(index: int) -> bytes:
                cert_id = CertId("sha1", issuer_hash.name_hash, issuer_hash.key_hash, 0x10000 + index)
                return signer.sign(
                    [SingleStatus(cert_id, "good")], this_update=now, next_update=now + timedelta(days=1)
                )

            rounds, count = args.rounds, args.count
            ecdsa = ec.ECDSA(hashes.SHA256())
            token_signature = best_cpu(rounds, count, lambda _i: token_key.sign(data, ecdsa))  # type: ignore[call-arg, arg-type]
            software_signature = best_cpu(rounds, count, lambda _i: software_key.sign(data, ecdsa))
            check = best_cpu(rounds, count, lambda _i: public_key.verify(signature, data, ecdsa))  # type: ignore[union-attr, call-arg, arg-type]
            csr = best_cpu(rounds, count, lambda i: read_csr(ders[i]))
            cert = best_cpu(rounds, count, certificate)
            answer = best_cpu(rounds, count, response)
            commit = durable_commit(work, rounds, min(count, 500))
        finally:
            pki.close()
    parts = {
        "token signature alone (ECDSA P-256, PKCS#11)": token_signature,
        "software signature alone (ECDSA P-256, cryptography), for comparison": software_signature,
        "signature check alone (ECDSA P-256)": check,
        "CSR: parsed, its signature checked (read_csr)": csr,
        "certificate: built, signed in the token, checked (Issuer.sign)": cert,
        "OCSP response: built, signed in the token, checked (ResponseSigner.sign)": answer,
        "one fsync'd SQLite write transaction (bare sqlite3)": commit,
    }
    per_enrollment = {
        "CSR": csr,
        "certificate": cert,
        "OCSP response": answer,
        "commits (2 per enrollment, shared)": 2 * commit / args.group,
    }
    floor = sum(per_enrollment.values())
    command = " ".join(["bench/floor.py", *sys.argv[1:]])
    report = [
        f"{started:%Y-%m-%d %H:%M} UTC, `.venv/bin/python {command}`",
        "",
        "| part, measured alone | µs CPU per call |",
        "|---|---|",
        *(f"| {name} | {seconds * 1e6:.0f} |" for name, seconds in parts.items()),
        "",
        f"Per enrollment (two write transactions, each shared by {args.group:g} enrollments):",
        *(f"- {name}: {seconds * 1e3:.2f} ms" for name, seconds in per_enrollment.items()),
        f"- **floor: {floor * 1e3:.2f} ms**, before any SQL statement, HTTP, TLS or pipeline logic",
        f"- the same with a key in software instead of the token (as cfssl keeps its key; two signatures per "
        f"enrollment): {(floor - 2 * (token_signature - software_signature)) * 1e3:.2f} ms",
    ]
    if not args.no_core:
        line = core(max(args.count, 2000))
        report += ["", f"The pipeline in-process, same run (bench/enroll_cpu.py, 2 processes × 8 threads): {line}"]
        match = re.search(r"CPU ([0-9.]+) ms/cert", line)
        if match:
            whole = float(match.group(1))
            report.append(
                f"- of which the floor {floor * 1e3 / whole:.0%}; the rest, {whole - floor * 1e3:.2f} ms, is "
                "SQL statements, the ORM, the group commit and the pipeline's own Python"
            )
    text = "\n".join(report) + "\n"
    sys.stdout.write(text)
    args.out.write_text(f"# The floor of an enrollment's CPU: `bench/floor.py`\n\n{machine()}.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
