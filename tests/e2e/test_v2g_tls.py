"""A charging station's two SECC leaves in real TLS, on SQLite and PostgreSQL: `chargepki v2g init`
for ISO 15118-2 and ISO 15118-20 (with and without Sub-CA 1), `v2g issue` for keys the test
generates as the SECC would, OCSP through `chargepki serve ocsp` (verified by `openssl ocsp`),
and then OpenSSL as the SECC (`s_server`, stapling chargepki's response) and as the EV
(`s_client`, the V2G root its only trust anchor): TLS 1.3 with the P-521 leaf, TLS 1.2 with the
P-256 one. Loopback only, free ports.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import SignatureAlgorithmOID

from cli.main import cli
from tests.est_server import free_port, start_server
from tests.helpers import make_csr, make_key, openssl, write

ORG = "Acme Charging"


def _pkilint(tool: str, *args: str) -> str:
    """pkilint's findings at NOTICE and above for a CRL or an OCSP response (empty: nothing)."""
    from pkilint.bin import lint_crl, lint_ocsp_response

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        {"crl": lint_crl, "ocsp": lint_ocsp_response}[tool].main(["lint", *args])
    return out.getvalue().strip()


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _ok(home: Path, *args: str) -> Result:
    result = run(home, *args)
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result: Result, pattern: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and pattern in lines[0], result.stderr


@dataclass
class Secc:
    """One SECC leaf as the station holds it: its own key, the chain chargepki returned, the V2G root."""

    name: str
    tls: str  # the s_server / s_client protocol switch
    directory: Path
    key: Path
    leaf: Path
    sub_cas: Path  # Sub-CA 2 (then Sub-CA 1 when there is one): what the SECC sends after its leaf
    issuers: list[Path]  # each certificate's issuer, leaf first, up to the root
    members: list[Path]  # leaf, Sub-CA 2[, Sub-CA 1]
    root: Path
    staple: Path | None = None


def _secc(home: Path, tmp_path: Path, name: str, iso: str, environment: str, secc_id: str) -> Secc:
    """Key and CSR made as the SECC makes them; `v2g issue` certifies it; `ca chain` gives the root."""
    directory = tmp_path / name
    directory.mkdir()
    key = make_key("ec-p521" if iso == "15118-20" else "ec-p256")  # the SECC's key, never chargepki's
    key_path = write(
        directory / "key.pem",
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    csr = write(directory / "secc.csr", make_csr(secc_id, key=key))
    chain_path = directory / "chain.pem"
    issued = _ok(
        home, "v2g", "issue", "--iso", iso, "--environment", environment, "--csr", str(csr),
        "--secc-id", secc_id, "--out", str(chain_path),
    )  # fmt: skip
    assert "issued SECC certificate" in issued.stderr
    chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
    # The root is the EV's trust anchor: `ca chain` ends with it, `v2g issue` never sends it.
    assert chain[-1].issuer != chain[-1].subject
    sub_ca_2 = f"{environment}-{'cpo20' if iso == '15118-20' else 'cpo'}-sub-ca2-1"
    assert f"[{environment}] CA {sub_ca_2}" in issued.stderr
    root = x509.load_pem_x509_certificates(_ok(home, "ca", "chain", "--ca", sub_ca_2).stdout.encode())[-1]
    assert root.issuer == root.subject
    members = [
        write(directory / f"member-{index}.pem", c.public_bytes(serialization.Encoding.PEM))
        for index, c in enumerate(chain)
    ]
    root_path = write(directory / "root.pem", root.public_bytes(serialization.Encoding.PEM))
    return Secc(
        name,
        "-tls1_3" if iso == "15118-20" else "-tls1_2",
        directory,
        key_path,
        members[0],
        write(directory / "sub-cas.pem", b"".join(path.read_bytes() for path in members[1:])),
        [*members[1:], root_path],
        members,
        root_path,
    )


def _ocsp(secc: Secc, url: str, index: int) -> tuple[Path, ocsp.OCSPResponse]:
    """`openssl ocsp` asks chargepki's responder about chain member ``index`` and verifies the answer
    with the V2G root as the only trust anchor."""
    target, issuer = secc.members[index], secc.issuers[index]
    response_path = secc.directory / f"member-{index}.ocsp"
    result = openssl(
        "ocsp", "-issuer", str(issuer), "-cert", str(target), "-CAfile", str(secc.root),
        "-verify_other", str(secc.sub_cas), "-url", url, "-no_nonce", "-respout", str(response_path),
    )  # fmt: skip
    assert result.returncode == 0 and "Response verify OK" in result.stderr, result.stdout + result.stderr
    assert f"{target}: good" in result.stdout, result.stdout
    return response_path, ocsp.load_der_ocsp_response(response_path.read_bytes())


@contextlib.contextmanager
def _s_server(secc: Secc) -> Iterator[int]:
    """`openssl s_server` as the SECC: its leaf, key and sub-CAs, stapling chargepki's OCSP response
    (`-www`: it answers each connection on its own and never reads stdin, so it outlives the probe)."""
    assert secc.staple is not None
    port = free_port()
    log = (secc.directory / "s_server.log").open("wb")
    command = [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", secc.tls, "-www", "-cert", str(secc.leaf),
        "-key", str(secc.key), "-cert_chain", str(secc.sub_cas), "-status_file", str(secc.staple),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (secc.directory / "s_server.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break  # the probe's aborted handshake is logged; s_server keeps accepting
            assert time.monotonic() < deadline, "s_server did not listen"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _s_client(secc: Secc, port: int, anchor: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`openssl s_client` as the EV: ``anchor`` its only trust anchor, verification errors fatal."""
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", secc.tls, "-CAfile", str(anchor),
        "-no-CApath", "-no-CAstore", "-verify", "4", "-verify_return_error", "-status", *extra,
    ]  # fmt: skip
    return subprocess.run(
        command,
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_secc_leaves_serve_tls_1_3_and_tls_1_2_to_an_ev_that_trusts_only_the_v2g_root(
    home: Path, tmp_path: Path
) -> None:
    # Both versions side by side in production; a -20 hierarchy without Sub-CA 1 in staging.
    _ok(home, "init", "--org", ORG)
    two = _ok(home, "v2g", "init", "--org", ORG, "--country", "DE").output
    assert "V2G hierarchy (ISO 15118-2)" in two and "production-cpo-sub-ca2-1" in two
    twenty = _ok(home, "v2g", "init", "--iso", "15118-20", "--org", ORG, "--country", "DE").output
    assert "V2G hierarchy (ISO 15118-20)" in twenty and "production-cpo20-sub-ca1-1" in twenty
    assert "or v2g20), or `chargepki v2g issue --iso 15118-20`" in twenty
    short = _ok(
        home, "v2g", "init", "--iso", "15118-20", "--without-sub-ca-1", "--org", ORG, "--country", "DE",
        "--environment", "staging",
    ).output  # fmt: skip
    assert "Sub-CA 1  none: Sub-CA 2 is directly under the root" in short and "staging-cpo20-sub-ca2-1" in short
    _one_line_error(run(home, "v2g", "init", "--iso", "15118-20", "--org", ORG), "already has an ISO 15118-20")
    _one_line_error(
        run(home, "v2g", "init", "--without-sub-ca-1", "--org", ORG, "--environment", "factory-test"),
        "--without-sub-ca-1 is for ISO 15118-20",
    )
    _one_line_error(
        run(home, "v2g", "issue", "--iso", "15118-20", "--environment", "factory-test", "--secc-id", "DE*ACM*E1*1",
            "--csr", str(write(tmp_path / "x.csr", make_csr("DE*ACM*E1*1", key=make_key("ec-p521"))))),
        "no active ISO 15118-20 CPO Sub-CA 2 in environment 'factory-test'",
    )  # fmt: skip
    _one_line_error(
        run(home, "v2g", "issue", "--iso", "15118-20", "--secc-id", "DE*ACM*E1*1", "--environment", "production",
            "--csr", str(write(tmp_path / "y.csr", make_csr("DE*ACM*E1*1")))),
        "key type ec-p256 is not allowed for profile v2g20-secc",
    )  # fmt: skip
    _one_line_error(
        run(home, "v2g", "issue", "--iso", "15118-20", "--secc-id", "DE*ACM*E1*1",
            "--csr", str(write(tmp_path / "z.csr", make_csr("DE*ACM*E1*1", key=make_key("ec-p521"))))),
        "several environments have ISO 15118-20 V2G CAs (production, staging): choose one with --environment",
    )  # fmt: skip
    listing = _ok(home, "ca", "list").output
    for role in ("v2g-sub-ca-2", "v2g20-root", "v2g20-sub-ca-1", "v2g20-sub-ca-2"):
        assert role in listing

    seccs = [
        _secc(home, tmp_path, "iso2", "15118-2", "production", "DE*ACM*E0001*1"),
        _secc(home, tmp_path, "iso20", "15118-20", "production", "DE*ACM*E0001*1"),  # the same station, both
        _secc(home, tmp_path, "iso20-short", "15118-20", "staging", "DE*ACM*E0002*1"),
    ]
    assert [len(secc.members) for secc in seccs] == [3, 3, 2]
    for secc in seccs:
        result = openssl(
            "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(secc.root),
            "-untrusted", str(secc.sub_cas), str(secc.leaf),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    # CRLs of the new CAs (P-521, ecdsa-with-SHA512) verify too.
    _ok(home, "crl", "publish")
    bundle = write(tmp_path / "iso20-cas.pem", b"".join(path.read_bytes() for path in seccs[1].issuers))
    short = write(tmp_path / "short-cas.pem", b"".join(path.read_bytes() for path in seccs[2].issuers))
    for name, cas in (
        ("production-cpo20-sub-ca2-1", bundle),
        ("production-cpo20-sub-ca1-1", bundle),
        ("production-v2g20-root-1", bundle),
        (
            "staging-cpo20-sub-ca2-1",
            write(tmp_path / "short-cas.pem", b"".join(p.read_bytes() for p in seccs[2].issuers)),
        ),
    ):
        result = openssl(
            "crl", "-inform", "DER", "-in", str(home / "pki" / f"{name}.crl"), "-CAfile", str(cas), "-noout",
            "-verify", "-text",
        )  # fmt: skip
        assert "verify OK" in result.stdout + result.stderr, result.stderr
        assert "ecdsa-with-SHA512" in result.stdout
        crl = str(home / "pki" / f"{name}.crl")
        assert _pkilint("crl", "-t", "CRL", "-p", "PKIX", "-s", "NOTICE", crl) == "", name

    server = start_server(home, free_port(), service="ocsp")
    url = f"http://127.0.0.1:{server.port}/ocsp"
    sizes: dict[str, list[int]] = {}
    try:
        for secc in seccs:
            for index in range(len(secc.members)):  # the leaf and every sub-CA of its chain
                path, response = _ocsp(secc, url, index)
                assert response.next_update_utc - response.this_update_utc == timedelta(days=14)
                expected = (
                    SignatureAlgorithmOID.ECDSA_WITH_SHA512
                    if secc.tls == "-tls1_3"
                    else (SignatureAlgorithmOID.ECDSA_WITH_SHA256)
                )
                assert response.signature_algorithm_oid == expected
                sizes.setdefault(secc.name, []).append(len(path.read_bytes()))
                assert _pkilint("ocsp", "-s", "NOTICE", str(path)) == "", path
                if index == 0:
                    secc.staple = path
    finally:
        server.stop()
    assert all(size < 1500 for values in sizes.values() for size in values), sizes

    for secc in seccs:
        if secc.tls == "-tls1_3":  # ISO 15118-20: TLS 1.3, P-521 signature with SHA-512
            extra = ("-sigalgs", "ecdsa_secp521r1_sha512", "-groups", "secp521r1")
            protocol, digest, exchange = "TLSv1.3", "SHA512", "Server Temp Key: ECDH, secp521r1"
        else:  # ISO 15118-2: TLS 1.2, ECDHE-ECDSA with AES-128-CBC-SHA256
            extra = ("-cipher", "ECDHE-ECDSA-AES128-SHA256")
            protocol, digest, exchange = "TLSv1.2", "SHA256", "Cipher is ECDHE-ECDSA-AES128-SHA256"
        with _s_server(secc) as port:
            result = _s_client(secc, port, secc.root, *extra)
            output = result.stdout + result.stderr
            assert result.returncode == 0, output
            assert "Verify return code: 0 (ok)" in output, output
            assert f"Protocol  : {protocol}" in output or f"New, {protocol}" in output, output
            assert "Peer signature type: ECDSA" in output and f"Peer signing digest: {digest}" in output, output
            assert exchange in output, output
            assert "OCSP Response Status: successful" in output and "Cert Status: good" in output, output
            # The same server refused by an EV trusting another V2G root (here the other version's).
            other = seccs[0].root if secc is not seccs[0] else seccs[1].root
            refused = _s_client(secc, port, other, *extra)
            assert refused.returncode != 0 and "certificate verify failed" in refused.stderr, refused.stderr
