"""``make fuzz``: a coverage-guided session (atheris = libFuzzer for Python) over the edge parsers.

Each target runs in its own process for its share of the time, with a corpus under
``var/fuzz/corpus/<target>`` seeded from valid inputs and kept between runs. The same oracles
as the property tests (tests/hostile.py) judge every input; a violation or an unexpected
exception is a *finding*: recorded once per kind and place (``var/fuzz/findings``) with the
input that caused it, and the session goes on. A hang (libFuzzer ``-timeout``) or a crash of
the process is a finding too. At the end: executions, coverage and findings per target.

    python -m tests.fuzz [--seconds 300] [--targets csr,est-framing,est-app,ocsp,ocsp-app,csv]

Targets run in-process against a real installation where they need one (SoftHSM2 token and
SQLite in a temporary directory). The CLI is not here: one invocation costs ~30 ms, too slow
for this loop; tests/cli/test_hostile_cli.py covers it (HYPOTHESIS_PROFILE=fuzz for a long run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ca.work import Work

ROOT = Path(__file__).parent.parent
TARGETS = ("csr", "est-framing", "est-app", "ocsp", "ocsp-app", "csv")
# What atheris instruments for coverage: our code and the pure-Python ASN.1 parser under it.
INSTRUMENTED = ["ca", "ocsp", "web", "asn1crypto", "tests.hostile"]


# -- in the target process -----------------------------------------------------------------------------
class Recorder:
    """Findings, once per kind and place, each with the input that caused it."""

    def __init__(self, directory: Path, target: str) -> None:
        self.directory, self.target = directory, target
        self.seen: set[str] = set()
        directory.mkdir(parents=True, exist_ok=True)

    def record(self, exc: BaseException, data: bytes) -> None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/site-packages/" not in f.filename]
        place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        message = re.sub(r"\d+(\.\d+)*", "N", str(exc).splitlines()[0] if str(exc) else "")[:120]
        kind = f"{type(exc).__name__} at {place}: {message}"
        if kind in self.seen:
            return
        self.seen.add(kind)
        digest = hashlib.sha1(data).hexdigest()[:12]
        (self.directory / f"{self.target}-{digest}.bin").write_bytes(data)
        with (self.directory / f"{self.target}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"target": self.target, "finding": kind, "input": f"{self.target}-{digest}.bin"}))
            handle.write("\n")


def _fdp_source(fdp: Any) -> Any:
    from tests.hostile import Source

    class FdpSource(Source):
        def integer(self, low: int, high: int) -> int:
            return fdp.ConsumeIntInRange(low, high)

        def raw(self, max_size: int) -> bytes:
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, max_size))

    return FdpSource()


def _world(tmp: Path) -> Any:
    """A real installation in ``tmp``: its own SoftHSM2 token (random PINs) and SQLite."""
    from ca.config import EstSettings, Pkcs11Settings, find_softhsm_module
    from ca.keys.softhsm import create_token, write_softhsm_conf
    from tests.hostile import build_world

    conf = write_softhsm_conf(tmp / "softhsm" / "softhsm2.conf")
    settings = Pkcs11Settings(
        module=find_softhsm_module(), token_label="fuzz", pin_file=tmp / "softhsm" / "user.pin", softhsm_conf=conf
    )
    create_token(settings)
    est = EstSettings(auth_max_failures_per_device=10**9, auth_max_failures_per_address=10**9)
    return build_world(tmp / "home", f"sqlite:///{tmp / 'fuzz.db'}", settings, est)


def build_target(name: str, tmp: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The function libFuzzer calls with each input, and the seed inputs."""
    import base64
    import io

    import atheris

    from ca.errors import ChargepkiError
    from ca.issuance.csr import read_csr
    from ocsp.requests import MalformedRequest, decode_get_path, parse_request
    from tests import hostile
    from web.est import decode_pkcs10

    seeds = hostile.make_seeds()
    csr_seeds = [seeds.csr_der, seeds.csr_pem, base64.encodebytes(seeds.csr_der)]

    def refusal(exc: Exception) -> None:
        hostile.one_line_error(str(exc) or "?", type(exc).__name__)

    if name == "csr":

        def csr(data: bytes) -> None:
            if data[:1] == b"\x01":  # structure-aware: damage inside the signed part, then sign again
                data = hostile.resigned_csr(seeds, _fdp_source(atheris.FuzzedDataProvider(data[1:])))
            try:
                read_csr(data)
            except ChargepkiError as exc:
                refusal(exc)

        return csr, [*csr_seeds, b"\x01" + bytes(64)]

    if name == "est-framing":

        def framing(data: bytes) -> None:
            try:
                read_csr(decode_pkcs10("application/pkcs10", data))
            except ChargepkiError as exc:
                refusal(exc)

        return framing, csr_seeds

    if name in ("ocsp", "ocsp-app"):
        world = _world(tmp)
        responder = hostile.build_ocsp(world, tmp / "signer.sock")
        ocsp_seeds = responder.requests
        if name == "ocsp":

            def ocsp(data: bytes) -> None:
                for parse in (parse_request, lambda d: parse_request(decode_get_path(d.decode("latin-1")))):
                    try:
                        parse(data)
                    except MalformedRequest as exc:
                        refusal(exc)

            return ocsp, [*ocsp_seeds, *(base64.b64encode(s) for s in ocsp_seeds)]

        def ocsp_app(data: bytes) -> None:
            fdp = atheris.FuzzedDataProvider(data)
            mode = fdp.ConsumeIntInRange(0, 3)
            rest = fdp.ConsumeBytes(fdp.remaining_bytes())
            if mode == 0:
                environ = hostile.ocsp_environ("POST", "/ocsp", rest, "application/ocsp-request")
            elif mode == 1:
                environ = hostile.ocsp_environ("GET", "/ocsp/" + base64.b64encode(rest).decode())
            elif mode == 2:
                environ = hostile.ocsp_environ("GET", "/ocsp/" + rest.decode("latin-1"))
            else:
                environ = hostile.ocsp_environ("GET", "/pki/" + rest.decode("latin-1"))
            before = hostile.snapshot(responder.store)
            status, headers, body = hostile.call_wsgi(responder.app, environ)
            if hostile.check_ocsp_answer(status, headers, body, "fuzz") != "SUCCESSFUL":
                hostile.unchanged(responder.store, before, "fuzz")

        return ocsp_app, [b"\x00" + s for s in ocsp_seeds] + [b"\x01" + s for s in ocsp_seeds]

    if name == "est-app":
        world = _world(tmp)
        client = hostile.est_client(world)

        def est_app(data: bytes) -> None:
            fdp = atheris.FuzzedDataProvider(data)
            auth = fdp.ConsumeIntInRange(0, 2)
            headers = {"Content-Type": "application/pkcs10"}
            if auth == 1:
                headers["Authorization"] = hostile.basic(hostile.DEVICE, world.secret)
            elif auth == 2:
                headers["Authorization"] = hostile.basic(hostile.DEVICE, fdp.ConsumeUnicodeNoSurrogates(20))
            mode = fdp.ConsumeIntInRange(0, 2)
            if mode == 0:
                body = fdp.ConsumeBytes(fdp.remaining_bytes())
            elif mode == 1:
                body = base64.encodebytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
            else:
                body = base64.encodebytes(hostile.resigned_csr(seeds, _fdp_source(fdp)))
            before = hostile.snapshot(world.pki.store)
            response = client.post("/.well-known/est/simpleenroll", data=body, headers=headers)
            hostile.check_est_answer(response, "fuzz")
            if response.status_code != 200:
                hostile.unchanged(world.pki.store, before, "fuzz")
                return
            from ca.registry.devices import get_device, reset_device
            from ca.registry.secrets import issue_secret

            with world.pki.store.session() as session:  # enrolled: open the device again for the next input
                reset_device(Work(session, "fuzz"), serial=hostile.DEVICE)
                world.secret = issue_secret(Work(session, "fuzz"), device=get_device(session, hostile.DEVICE))

        der_b64 = base64.encodebytes(seeds.csr_der)
        return est_app, [b"\x01\x01" + der_b64, b"\x00\x00" + seeds.csr_der, b"\x01\x02" + bytes(32)]

    if name == "csv":
        from ca.store.engine import Store

        store = Store(f"sqlite:///{tmp / 'csv.db'}")
        store.upgrade()
        from ca.registry.devices import import_devices

        def csv(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            with store.session() as session:
                try:
                    result = import_devices(Work(session, "fuzz"), stream=io.StringIO(text, newline=""), batch=5)
                except ChargepkiError as exc:
                    refusal(exc)
                    return
                finally:
                    session.rollback()
                for line, reason in result.refused:
                    hostile.one_line_error(reason, f"CSV line {line}")

        return csv, [seeds.csv.encode(), b"serial\n\x00\n", b'\xef\xbb\xbfserial,model\nCP-1,"a""b"\n']

    raise SystemExit(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")


def run_target(name: str, seconds: int, base: Path) -> None:
    """In the child: instrument, build the target, hand over to libFuzzer (which exits the process)."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        import asn1crypto.core  # noqa: F401

        import ca.issuance.csr  # noqa: F401
        import ocsp.requests  # noqa: F401
        import tests.hostile  # noqa: F401
        import web.est  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    target, seeds = build_target(name, tmp)
    corpus = base / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:12]}").write_bytes(seed)
    recorder = Recorder(base / "findings", name)

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:  # every exception is a finding: recorded, and the session goes on
            recorder.record(exc, data)

    artifacts = base / "findings" / f"{name}-"
    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={seconds}",
            "-timeout=10",  # one input taking longer is a hang
            "-rss_limit_mb=3072",
            "-max_len=8192",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}",
        ],
        one_input,
    )
    atheris.Fuzz()


# -- the driver -------------------------------------------------------------------------------------------
_STAT = re.compile(r"^stat::(\w+):\s*(\d+)", re.MULTILINE)
_COVERAGE = re.compile(r"cov: (\d+) ft: (\d+)")


def drive(seconds: int, targets: list[str], base: Path) -> int:
    findings_dir = base / "findings"
    findings_dir.mkdir(parents=True, exist_ok=True)
    for old in findings_dir.glob("*.jsonl"):
        old.unlink()
    share = max(10, seconds // len(targets))
    rows = []
    started = time.monotonic()
    for name in targets:
        print(f"fuzzing {name} for {share} s …", flush=True)
        log = base / f"{name}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
        with log.open("wb") as output:
            process = subprocess.run(
                [sys.executable, "-m", "tests.fuzz", "--run", name, "--seconds", str(share), "--dir", str(base)],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=environment,
                timeout=share + 300,
            )
        text = log.read_text(errors="replace")
        stats = {key: int(value) for key, value in _STAT.findall(text)}
        coverage = _COVERAGE.findall(text)
        crashed = process.returncode != 0
        found = []
        jsonl = findings_dir / f"{name}.jsonl"
        if jsonl.exists():
            found = [json.loads(line)["finding"] for line in jsonl.read_text().splitlines()]
        if crashed:
            reason = "timeout (hang)" if "Timeout" in text or "timeout" in text.split("==")[-1] else "crash"
            found.append(f"libFuzzer stopped the process: {reason}, see {log}")
        rows.append((name, stats.get("number_of_executed_units", 0), stats.get("average_exec_per_sec", 0),
                     coverage[-1] if coverage else ("?", "?"), found))  # fmt: skip
    elapsed = time.monotonic() - started
    lines = [f"chargepki fuzz session: {elapsed:.0f} s, {len(targets)} targets (atheris, libFuzzer)", ""]
    lines.append(f"{'target':<12} {'executions':>11} {'exec/s':>7} {'cov':>6} {'ft':>6}  findings")
    for name, runs, rate, (cov, ft), found in rows:
        lines.append(f"{name:<12} {runs:>11} {rate:>7} {cov:>6} {ft:>6}  {len(found)}")
    total = sum(len(found) for *_, found in rows)
    lines += ["", f"total executions {sum(r[1] for r in rows)}, findings {total}"]
    for name, *_, found in rows:
        lines += [f"  {name}: {finding}" for finding in found]
    if total:
        lines.append(f"inputs and logs: {base}")
    summary = "\n".join(lines)
    (base / "summary.txt").write_text(summary + "\n")
    print(summary)
    return 1 if total else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=300, help="the whole session (shared by the targets)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "fuzz")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one target in this process
    arguments = parser.parse_args()
    if arguments.run:
        run_target(arguments.run, arguments.seconds, arguments.dir)
        return
    targets = [t.strip() for t in arguments.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))} (choose from {', '.join(TARGETS)})")
    sys.exit(drive(arguments.seconds, targets, arguments.dir))


if __name__ == "__main__":
    main()
