"""A CSMS API call that needs no key is answered and audited while the token cannot be opened: the
call's audit entry is written without the token (an HSM outage must not turn lookups into 500s)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from ca.config import EstSettings
from ca.errors import TokenError
from ca.store.models import AuditEvent
from tests.web.test_api_sign_costs import site  # noqa: F401 - the fixture
from web.app import create_app


def test_a_lookup_is_answered_and_audited_while_the_token_is_down(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    pki, _app, headers = site

    def token_down() -> None:
        raise TokenError("the token cannot be opened (test)")

    monkeypatch.setattr(pki, "token", token_down)
    app = create_app(pki, EstSettings(default_environment="production"))  # a worker that never opened it
    response = app.test_client().get("/api/v1/certificates/" + "ab" * 32, headers=headers)
    assert response.status_code == 404, response.get_json()
    with pki.store.session() as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.action == "csms.api.lookup")).all()
    assert actions == ["csms.api.lookup"]
