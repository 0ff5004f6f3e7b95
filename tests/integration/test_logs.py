"""Structured logs: JSON lines with the request's id, one access line per request, and nothing personal in any line.

The whole loop (register, import, activate, issue, verify, a bad request, errors on a routed and a
hot path) runs with seeded values, every line the process logs meanwhile is captured as formatted
for output, and each seeded value is searched for in all of them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.domain.holders import controllers as holder_controllers
from app.domain.imports import controllers as import_controllers
from app.observability import logs
from app.observability.request_ids import RequestIds
from app.settings import Settings
from tests import factories
from tests.factories import Gate, bearer, dpop

SICHUAN = "510000"
SEEDED_PIN = "739184"


class CapturedLines:
    """Every log line the process writes while the test runs, as the output handler formats it."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logs.json_formatter())

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stream.getvalue().splitlines() if line]

    def records(self) -> list[dict[str, Any]]:
        """The lines, each parsed (every one must be a JSON object)."""
        parsed = [json.loads(line) for line in self.lines]
        assert all(isinstance(record, dict) for record in parsed)
        return parsed

    def access(self) -> list[dict[str, Any]]:
        return [record for record in self.records() if record.get("logger") == logs.ACCESS_LOGGER]


@pytest.fixture
def captured() -> Iterator[CapturedLines]:
    lines = CapturedLines()
    root = logging.getLogger()
    root.addHandler(lines.handler)
    try:
        yield lines
    finally:
        root.removeHandler(lines.handler)


def _seeded_name() -> str:
    """A distinct Chinese name per run, so a hit cannot come from another test's data."""
    given = "".join(chr(0x4E00 + int.from_bytes(os.urandom(2), "big") % 0x5000) for _ in range(2))
    return "欧阳" + given


async def test_a_whole_loop_logs_no_personal_data_or_secret(
    client: httpx.AsyncClient,
    admin_token: str,
    gate: Gate,
    captured: CapturedLines,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(import_controllers, "UPLOAD_DIR", tmp_path)
    citizen_id, name, card_number = factories.citizen_id(SICHUAN), _seeded_name(), factories.card_number()
    secrets: list[str] = [citizen_id, name, card_number, admin_token, gate.api_key, SEEDED_PIN]

    # Register a person and a card; import three more (one row rejected, its values echoed nowhere).
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id, "name": name, "card_number": card_number},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    issued = response.json()
    imported = [(factories.citizen_id(SICHUAN), _seeded_name(), factories.card_number()) for _ in range(3)]
    wrong_check = imported[2][0][:-1] + ("0" if imported[2][0][-1] != "0" else "1")
    rows = [f"{SICHUAN},{cid},{who},{number}" for cid, who, number in imported[:2]]
    rows.append(f"{SICHUAN},{wrong_check},{imported[2][1]},{imported[2][2]}")
    secrets += [value for row in imported for value in row] + [wrong_check]
    upload = await client.post(
        "/v1/operator/imports",
        content=("region,citizen_id,name,card_number\r\n" + "\r\n".join(rows) + "\r\n").encode(),
        headers={**bearer(admin_token), "Content-Type": "text/csv; charset=utf-8"},
    )
    assert upload.status_code == 202, upload.text
    job: dict[str, Any] = {}
    for _ in range(600):
        job = (await client.get(f"/v1/operator/imports/{upload.json()['id']}", headers=bearer(admin_token))).json()
        if job["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.05)
    assert (job["status"], job["created"], job["rejected"]) == ("succeeded", 2, 1), job

    # Activate, set a PIN, enter a wrong one, issue, verify (a routed scan and a hot one).
    session = await factories.activate(client, card_number, issued["activation_code"])
    access, refresh = session["access_token"], session["refresh_token"]
    secrets += [issued["activation_code"], access, refresh]
    assert (await client.put("/v1/holder/pin", json={"pin": SEEDED_PIN}, auth=dpop(access))).status_code == 204
    wrong = await client.post("/v1/holder/pin/verification", json={"pin": "000000"}, auth=dpop(access))
    factories.problem(wrong, 401)
    bundle = await client.post("/v1/holder/credentials", json={"purpose": "transit", "count": 2}, auth=dpop(access))
    assert bundle.status_code == 200, bundle.text
    texts = [item["credential"] for item in bundle.json()["credentials"]]
    secrets += texts
    assert (await factories.verify(client, gate, texts[0]))["result"] == "accepted"
    routed = await client.post(
        "/v1/verify", json={"credential": texts[0]}, headers={**gate.headers, "Content-Type": "application/json; x=1"}
    )
    assert routed.status_code == 200 and routed.json()["repeated"] is True  # the same gate asked again

    # Bad requests that carry the values: a body that fails validation, a card number in a query and a path.
    bad = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id + "9", "name": name, "card_number": 7},
        headers=bearer(admin_token),
    )
    factories.problem(bad, 400)
    assert (await client.get(f"/health?card_number={card_number}&citizen_id={citizen_id}")).status_code == 200
    factories.problem(await client.get(f"/v1/nowhere/{card_number}/{citizen_id}"), 404)
    factories.problem(
        await client.post("/v1/verify", json={"credential": texts[1]}, headers={"X-Api-Key": "ecv1.x"}), 401
    )

    # Unexpected errors whose messages carry every value: on a routed handler and on the hot issuing path.
    leak = f"cannot serve {citizen_id} {name} {card_number} {access} {gate.api_key} {texts[1]}"

    def broken(*_: object, **__: object) -> Any:
        raise RuntimeError(leak)

    monkeypatch.setattr(holder_controllers, "render_qr", broken)
    monkeypatch.setattr(holder_controllers, "issue_credentials", broken)
    failed = await client.post("/v1/holder/credentials/qr", json={"credential": texts[1]}, auth=dpop(access))
    hot_failed = await client.post("/v1/holder/credentials", json={"purpose": "transit"}, auth=dpop(access))
    for response in (failed, hot_failed):
        factories.problem(response, 500)
        assert response.json()["request_id"] == response.headers["x-request-id"]

    records = captured.records()
    exceptions = [record for record in records if "exception" in record]
    assert len(exceptions) >= 2 and all("RuntimeError: cannot serve" in record["exception"] for record in exceptions)
    assert {failed.headers["x-request-id"], hot_failed.headers["x-request-id"]} <= {
        record.get("request_id") for record in exceptions
    }
    text = "\n".join(captured.lines)
    for value in secrets:
        assert value not in text, f"{value!r} reached a log line"


async def test_one_access_line_per_request_with_template_and_no_query(
    client: httpx.AsyncClient, admin_token: str, gate: Gate, captured: CapturedLines
) -> None:
    number = factories.card_number()
    asked = [
        await client.get(f"/health?card_number={number}"),
        await client.get(f"/v1/operator/cards/{uuid.uuid4()}", headers=bearer(admin_token)),
        await client.get(f"/v1/nowhere/{number}"),
        await client.post("/v1/verify", json={"credential": "EC1:0"}, headers=gate.headers),
    ]
    by_id = {record["request_id"]: record for record in captured.access()}
    assert len(by_id) == len(captured.access())
    routes = []
    for response in asked:
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", request_id)
        line = by_id[request_id]
        assert line["status"] == response.status_code and line["method"] == response.request.method
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["level"] == "info" and line["event"] == "request" and line["timestamp"]
        routes.append(line["route"])
    assert routes[0] == "/health" and routes[2] == "unmatched" and routes[3] == "/v1/verify"
    assert "{" in routes[1]  # the route's template, not the path that was asked
    assert number not in "\n".join(captured.lines)
    assert len({response.headers["x-request-id"] for response in asked}) == len(asked)


async def test_lines_logged_while_answering_carry_the_request_id(
    client: httpx.AsyncClient, captured: CapturedLines
) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    logging.getLogger("app.test").warning("outside any request")
    records = captured.records()
    assert any(record.get("request_id") == response.headers["x-request-id"] for record in records)
    [outside] = [record for record in records if record["event"] == "outside any request"]
    assert "request_id" not in outside and outside["logger"] == "app.test" and outside["level"] == "warning"


def test_redaction_replaces_values_and_fields() -> None:
    citizen_id, number = factories.citizen_id(), factories.card_number()
    letters_only = "TYFJJFKSC"  # a card number may have no digit
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    message = (
        f"person {citizen_id} 张三 card {number} and {letters_only} Bearer {token} "
        f"key ecv1.{'ab' * 16}.s3cr3t-x code 1234-5678 "
        "QR EC1:6BFOXN*TS0BI$ZD-PHRTW refresh rt_abcDEF [SQL: INSERT x]\n[parameters: ('王五', 'x')]\n(Background)"
    )
    record = logs.redact(None, "info", {"event": message, "name": "Li Lei", "pin": "1234", "nested": {"token": "t"}})
    assert record["name"] == record["pin"] == logs.REDACTED and record["nested"] == {"token": logs.REDACTED}
    for value in (
        citizen_id,
        number,
        letters_only,
        token,
        "s3cr3t",
        "1234-5678",
        "EC1:",
        "rt_abc",
        "张三",
        "王五",
        "parameters: (",
    ):
        assert value not in record["event"], value
    # Ordinary words, ids and numbers stay readable.
    kept = "verify took 1.5 ms for terminal 6f1c2a3b4c5d6e7f region 510000 at 1764680000123 (suspended, HTTP 503)"
    assert logs.redact_text(kept) == kept


def test_levels_per_logger_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECARD_LOG_LEVEL", "warning")
    monkeypatch.setenv("ECARD_LOG_LEVELS", "app.domain.imports=DEBUG, ecard.access=WARNING")
    settings = Settings.from_env()
    assert settings.log_level == "WARNING"
    assert settings.log_levels == (("app.domain.imports", "DEBUG"), ("ecard.access", "WARNING"))
    standard = logs.logging_plugin(settings)._config.structlog_logging_config.standard_lib_logging_config
    assert standard is not None
    assert standard.root["level"] == "WARNING"
    assert standard.loggers["app.domain.imports"]["level"] == "DEBUG"
    assert standard.loggers[logs.ACCESS_LOGGER]["level"] == "WARNING"
    # uvicorn's own access line (path and query string) is off whatever the settings say.
    assert standard.loggers["uvicorn.access"] == {"level": "WARNING", "propagate": False, "handlers": []}
    monkeypatch.setenv("ECARD_LOG_LEVELS", "app=LOUD")
    with pytest.raises(ValueError, match="unknown log level"):
        Settings.from_env()


def _scope(peer: str, request_id: str | None) -> dict[str, Any]:
    headers = [(b"x-request-id", request_id.encode())] if request_id is not None else []
    return {"type": "http", "client": (peer, 50000), "headers": headers}


def test_a_request_id_is_taken_only_from_a_trusted_proxy_and_only_when_plain() -> None:
    ids = RequestIds(("10.0.0.0/8", "::1"))
    assert ids.of(_scope("10.1.2.3", "lb-4f2a9c01")) == "lb-4f2a9c01"  # type: ignore[arg-type]
    assert ids.of(_scope("::1", "lb-4f2a9c01")) == "lb-4f2a9c01"  # type: ignore[arg-type]
    for peer, given in (
        ("192.0.2.7", "lb-4f2a9c01"),  # not a proxy of ours: its id could be anything
        ("10.1.2.3", 'x" {"event": "forged"}'),  # a log line's worth of text
        ("10.1.2.3", "short"),
        ("10.1.2.3", "y" * 65),
        ("10.1.2.3", None),
        ("not-an-address", "lb-4f2a9c01"),
    ):
        chosen = ids.of(_scope(peer, given))  # type: ignore[arg-type]
        assert chosen != given and re.fullmatch(r"[0-9a-f]{16}", chosen), (peer, given)
    assert RequestIds(()).of(_scope("10.1.2.3", "lb-4f2a9c01")) != "lb-4f2a9c01"  # type: ignore[arg-type]
