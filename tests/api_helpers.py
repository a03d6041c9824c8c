"""Shared by the CSMS API tests: every answer is checked against the OpenAPI document's schemas."""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft202012Validator

from web.openapi import DOCUMENT

CHECKED: set[tuple[str, str, int]] = set()  # (path template, method, status) answers seen and validated


def template_of(path: str) -> str | None:
    """The documented path template a concrete path matches (``/api/v1/sign/ab12…`` → ``/api/v1/sign/{jobId}``)."""
    path = path.split("?", 1)[0]
    if path in DOCUMENT["paths"]:
        return path
    for template in DOCUMENT["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def check_answer(method: str, path: str, status: int, content_type: str | None, body: Any) -> None:
    """The status is documented for the operation, and the JSON body matches its schema."""
    template = template_of(path)
    if template is None:  # no such route: a JSON 404 all the same
        assert status == 404, f"{path} is not documented"
        Draft202012Validator({**_error(), "components": DOCUMENT["components"]}).validate(body)
        return
    operation = DOCUMENT["paths"][template].get(method.lower())
    if operation is None and status in (404, 405):
        operation = {"responses": {str(status): {"content": {"application/json": {"schema": _error()}}}}}
    assert operation is not None, f"{method} {template} is not documented"
    assert str(status) in operation["responses"] or status in (404, 405), f"{method} {template}: {status} undocumented"
    assert content_type is not None and content_type.startswith("application/json"), content_type
    documented = operation["responses"].get(str(status)) or {"content": {"application/json": {"schema": _error()}}}
    schema = documented["content"]["application/json"].get("schema")
    if schema is not None:
        Draft202012Validator({**schema, "components": DOCUMENT["components"]}).validate(body)
    CHECKED.add((template, method.lower(), status))


def _error() -> dict[str, str]:
    return {"$ref": "#/components/schemas/Error"}


class CheckedClient:
    """A Flask test client whose every /api/ answer is validated against the document."""

    def __init__(self, client: Any, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}

    def open(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = self.client.open(path, method=method, headers=headers, **kwargs)
        if path.startswith("/api/"):
            check_answer(method, path, response.status_code, response.content_type, response.get_json(silent=True))
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.open("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.open("POST", path, **kwargs)
