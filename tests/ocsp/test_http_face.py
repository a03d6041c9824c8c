"""The responder's HTTP face (ocsp/wsgi.py) on its own: media types and RFC 5019 §6.2 caching headers."""

from __future__ import annotations

import io
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.config import embedded_defaults
from ocsp.responder import Answer
from ocsp.source import stored
from ocsp.wsgi import OcspApp, host_counter


class _Fixed:
    """A responder that answers every request with one stored response."""

    def __init__(self, next_update_in: float) -> None:
        now = datetime.now(UTC)
        self.response = stored(b"\x30\x03\x0a\x01\x00", now, now + timedelta(seconds=next_update_in))
        self.requests: list[bytes] = []

    def answer(self, der: bytes) -> Answer:
        self.requests.append(der)
        return Answer(self.response.der, self.response, "cache")


def _post(app: OcspApp, content_type: str, body: bytes = b"\x30\x00") -> tuple[str, dict[str, str]]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        got["status"], got["headers"] = status, dict(headers)

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/ocsp",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    app(environ, start_response)
    return got["status"], got["headers"]


@pytest.mark.parametrize(
    "content_type", ["application/ocsp-request", "Application/OCSP-Request", "application/ocsp-request; charset=x"]
)
def test_the_ocsp_media_type_is_read_whatever_its_case_and_parameters(content_type: str) -> None:
    responder = _Fixed(next_update_in=7200)
    status, headers = _post(OcspApp(responder, max_age=3600), content_type)  # type: ignore[arg-type]
    assert status == "200 OK" and headers["Content-Type"] == "application/ocsp-response"
    assert responder.requests == [b"\x30\x00"]


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/ocsp-requests", "application/ocsp"])
def test_any_other_media_type_is_refused_before_the_responder_sees_it(content_type: str) -> None:
    responder = _Fixed(next_update_in=7200)
    status, _ = _post(OcspApp(responder, max_age=3600), content_type)  # type: ignore[arg-type]
    assert status.startswith("415") and responder.requests == []


@pytest.mark.parametrize(("next_update_in", "expected"), [(7200, 3600), (3600.5, 3600), (1800.5, 1800), (0.5, 0)])
def test_a_cache_may_keep_an_answer_for_max_age_but_never_past_its_next_update(
    next_update_in: float, expected: int
) -> None:
    began = time.time()
    _, headers = _post(OcspApp(_Fixed(next_update_in), max_age=3600), "application/ocsp-request")  # type: ignore[arg-type]
    max_age = int(headers["Cache-Control"].split("max-age=")[1].split(",")[0])
    # Seconds pass between building the answer and the header: the age may be one less, never more.
    assert expected - 1 - int(time.time() - began) <= max_age <= expected
    assert headers["Cache-Control"].endswith(", public, no-transform, must-revalidate")


def test_the_responder_processes_share_their_change_counter_in_the_homes_run_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``run/ocsp-counter`` (0600, its folder 0700); where it cannot be made (here ``run`` is a file),
    the responder still starts, each process following the store alone, and says so."""
    home = tmp_path / "home"
    counter = host_counter(embedded_defaults(home))
    assert counter is not None and counter.path == home / "run" / "ocsp-counter"
    assert (home / "run").stat().st_mode & 0o777 == 0o700 and counter.path.stat().st_mode & 0o777 == 0o600
    counter.close()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "run").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ocsp.wsgi"):
        assert host_counter(embedded_defaults(blocked)) is None
    assert "cannot share its change counter" in caplog.text
