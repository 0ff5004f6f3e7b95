"""The hot paths answer exactly as the routed handlers do, and hand on what they do not take.

A request with `Content-Length` and its credential header (`X-Api-Key` for a scan,
`Authorization` for issuing) is answered in front of Litestar's routing; a chunked one (no
`Content-Length`) goes through the routed handler. Both must give the same status, headers and
body for the same situation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar import Litestar, post

from app.domain.verification.controllers import HOT_VERIFY
from app.domain.verification.service import CredentialVerifier
from app.http.hot_paths import HotPaths, HotRoute
from app.server.context import STATE_KEY, ServiceContext
from app.server.plugin import EcardPlugin
from app.server.request_observer import RequestObserver
from tests import factories
from tests.factories import Gate, Holder

VOLATILE = ("verification_id", "first_used_at", "request_id")
JSON_TYPE = (b"content-type", b"application/json")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data[:10]
    yield data[10:]


async def hot(client: httpx.AsyncClient, gate: Gate, credential: str) -> httpx.Response:
    response = await client.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
    assert "content-length" in response.request.headers
    return response


async def routed(client: httpx.AsyncClient, gate: Gate, credential: str) -> httpx.Response:
    """The same request sent chunked: no Content-Length, so the hot path hands it on."""
    body = b'{"credential": "' + credential.encode() + b'"}'
    response = await client.post(
        "/v1/verify", content=_chunks(body), headers={**gate.headers, "content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    return response


@pytest.fixture
async def gate(client: httpx.AsyncClient, admin_token: str) -> Gate:
    """A transit gate of this test alone (the session's gate may have spent its rate budget)."""
    return await factories.new_gate(client, admin_token, "510000", "transit", ["transit"])


def comparable(response: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    body = {key: value for key, value in response.json().items() if key not in VOLATILE}
    return response.status_code, response.headers["content-type"], body


def test_the_hot_paths_are_installed_once(app: Litestar, client: httpx.AsyncClient) -> None:
    observer = app.asgi_handler
    # The request observer sits in front of the hot paths, which sit in front of Litestar's handler.
    assert isinstance(observer, RequestObserver)
    handler = observer._next
    assert isinstance(handler, HotPaths)
    app.plugins.get(EcardPlugin).install_front(app, app.state[STATE_KEY])
    assert app.asgi_handler is observer and observer._next is handler
    # Their paths are the routed handlers' own, read from the app's routes.
    assert handler.paths == ["/v1/verify", "/v1/holder/credentials"]


def test_a_hot_route_for_a_handler_the_app_does_not_route_stops_the_start_up(app: Litestar) -> None:
    @post("/v1/elsewhere", request_max_body_size=100)
    async def unrouted() -> None:
        return None

    front = HotPaths(app, app.asgi_handler)
    with pytest.raises(RuntimeError, match="routes it 0 times"):
        front.bind([HotRoute(unrouted, b"x-api-key", HOT_VERIFY.answer)], app.state[STATE_KEY])


async def test_same_answers_both_ways(client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate) -> None:
    other = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    first, second = await factories.credentials(client, holder), await factories.credentials(client, holder)
    [medical] = await factories.credentials(client, holder, "medical")

    accepted = [await hot(client, gate, first[0]), await routed(client, gate, second[0])]
    assert comparable(accepted[0]) == comparable(accepted[1])
    assert comparable(accepted[0])[:2] == (200, "application/json")
    assert accepted[0].json()["result"] == "accepted"

    replays = [await hot(client, other, first[0]), await routed(client, other, second[0])]
    assert comparable(replays[0]) == comparable(replays[1])
    assert replays[0].json()["reason"] == "replayed" and replays[1].json()["first_used_at"]

    # The same gate again within its retry window: the first answer, with its id, either way.
    again = [await routed(client, gate, first[0]), await hot(client, gate, second[0])]
    assert again[0].json()["verification_id"] == accepted[0].json()["verification_id"]
    assert again[1].json()["verification_id"] == accepted[1].json()["verification_id"]
    assert comparable(again[0]) == comparable(again[1])
    assert again[0].json()["repeated"] is True

    for text in ("EC1:!!!", medical):
        assert comparable(await hot(client, gate, text)) == comparable(await routed(client, gate, text))


async def test_rate_limited_problem_is_the_same_both_ways(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate
) -> None:
    limited = await factories.new_terminal(
        client, admin_token, gate.organisation_id, ["transit"], rate_per_minute=1, rate_burst=1
    )
    texts = [(await factories.credentials(client, holder))[0] for _ in range(3)]
    assert (await hot(client, limited, texts[0])).json()["result"] == "accepted"
    refusals = [await hot(client, limited, texts[1]), await routed(client, limited, texts[2])]
    for response in refusals:
        assert response.status_code == 429
        assert response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["retry-after"]) >= 1
    # Each answer names its own request, in its body and its header.
    for response in refusals:
        assert response.json()["request_id"] == response.headers["x-request-id"]
    bodies = [{k: v for k, v in r.json().items() if k not in ("retry_after_ms", "request_id")} for r in refusals]
    assert bodies[0] == bodies[1] and bodies[0]["code"] == "rate_limited"


async def test_requests_it_does_not_take_get_the_routed_problems(
    client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    [credential] = await factories.credentials(client, holder)
    unknown = {"X-Api-Key": "ecv1." + "0" * 32 + ".x"}
    response = await client.post("/v1/verify", json={"credential": credential}, headers=unknown)
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    response = await client.post(
        "/v1/verify", content=b"{", headers={**gate.headers, "content-type": "application/json"}
    )
    assert (response.status_code, response.json()["code"]) == (400, "bad_request")
    response = await client.post(
        "/v1/verify", json={"credential": credential}, headers={**gate.headers, "content-type": "text/plain"}
    )
    assert (response.status_code, response.json()["code"]) == (415, "unsupported_media_type")
    # Neither consumed the credential.
    assert (await hot(client, gate, credential)).json()["result"] == "accepted"


async def test_an_unexpected_error_is_a_500_problem(
    client: httpx.AsyncClient,
    context: ServiceContext,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(self: CredentialVerifier, *args: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(CredentialVerifier, "verify", broken)
    with caplog.at_level(logging.ERROR):
        response = await hot(client, gate, "EC1:anything")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "internal_error" and "injected" not in response.text
    assert any(record.exc_info and "injected fault" in str(record.exc_info[1]) for record in caplog.records)


async def asgi_call(app: Litestar, headers: list[tuple[bytes, bytes]], messages: list[dict[str, Any]]) -> list[Any]:
    """Drive the app as an ASGI server would; what it sent back."""
    sent: list[Any] = []
    incoming = iter(messages)

    async def receive() -> Any:
        return next(incoming, {"type": "http.disconnect"})

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/verify", "raw_path": b"/v1/verify", "root_path": "",
        "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }  # fmt: skip
    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


async def test_a_body_in_pieces_is_assembled(
    app: Litestar, client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    [credential] = await factories.credentials(client, holder)
    body = b'{"credential": "' + credential.encode() + b'"}'
    headers = [(b"x-api-key", gate.api_key.encode()), (b"content-length", str(len(body)).encode()), JSON_TYPE]
    pieces = [
        {"type": "http.request", "body": body[i : i + 50], "more_body": i + 50 < len(body)}
        for i in range(0, len(body), 50)
    ]
    sent = await asgi_call(app, headers, pieces)
    assert sent[0]["status"] == 200
    assert b'"result":"accepted"' in sent[1]["body"]


async def test_a_client_gone_before_its_body_gets_nothing_and_uses_nothing(
    app: Litestar, client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    [credential] = await factories.credentials(client, holder)
    headers = [(b"x-api-key", gate.api_key.encode()), (b"content-length", b"300"), JSON_TYPE]
    assert await asgi_call(app, headers, [{"type": "http.request", "body": b'{"cre', "more_body": True}]) == []
    assert (await hot(client, gate, credential)).json()["result"] == "accepted"


# --- issuing credentials -----------------------------------------------------------------------


async def issue_hot(client: httpx.AsyncClient, holder: Holder, body: dict[str, Any]) -> httpx.Response:
    response = await client.post("/v1/holder/credentials", json=body, auth=holder.auth)
    assert "content-length" in response.request.headers
    return response


async def issue_routed(client: httpx.AsyncClient, holder: Holder, body: dict[str, Any]) -> httpx.Response:
    headers = {"content-type": "application/json"}
    response = await client.post(
        "/v1/holder/credentials", content=_chunks(json.dumps(body).encode()), headers=headers, auth=holder.auth
    )
    assert "content-length" not in response.request.headers
    return response


def bundle_shape(response: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    """Status, content type, and the body with what differs between two issues (texts, times) reduced to its type."""
    body = response.json()
    if response.status_code == 200:
        body = {
            **body,
            "server_time": type(body["server_time"]).__name__,
            "credentials": [{key: type(value).__name__ for key, value in item.items()} for item in body["credentials"]],
        }
    else:
        body = {key: value for key, value in body.items() if key != "request_id"}
    return response.status_code, response.headers["content-type"], body


async def test_issuing_gives_the_same_answers_both_ways(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder, gate: Gate
) -> None:
    for body in ({"purpose": "general", "count": 3}, {"purpose": "transit"}):
        hot_answer, routed_answer = await issue_hot(client, holder, body), await issue_routed(client, holder, body)
        assert bundle_shape(hot_answer) == bundle_shape(routed_answer)
        assert hot_answer.status_code == 200 and len(hot_answer.json()["credentials"]) == body.get("count", 1)
    # The hot path's transit credential is a good one.
    assert (await hot(client, gate, hot_answer.json()["credentials"][0]["credential"])).json()["result"] == "accepted"

    # Problems raised while answering: the same bodies either way.
    for body in ({"purpose": "medical"}, {"purpose": "transit", "count": 99}):
        hot_answer, routed_answer = await issue_hot(client, holder, body), await issue_routed(client, holder, body)
        assert bundle_shape(hot_answer) == bundle_shape(routed_answer)
        assert hot_answer.status_code in (400, 403)

    await factories.set_ecard_state(client, admin_token, holder, "suspended")
    suspended = [
        await issue_hot(client, holder, {"purpose": "transit"}),
        await issue_routed(client, holder, {"purpose": "transit"}),
    ]
    assert bundle_shape(suspended[0]) == bundle_shape(suspended[1])
    assert suspended[0].status_code == 409

    session = context.tokens.read_holder(holder.access_token)
    await context.mirror.revoke_device(session.card_ref, session.device_id, 60)
    removed = [
        await issue_hot(client, holder, {"purpose": "transit"}),
        await issue_routed(client, holder, {"purpose": "transit"}),
    ]
    assert bundle_shape(removed[0]) == bundle_shape(removed[1])
    assert removed[0].status_code == 401 and "removed" in removed[0].json()["detail"]


async def test_issuing_requests_it_does_not_take_get_the_routed_problems(
    client: httpx.AsyncClient, holder: Holder
) -> None:
    url = "/v1/holder/credentials"
    for headers, code in (
        ({"Authorization": "Bearer not-a-token"}, "dpop_required"),
        ({"Authorization": "Basic abc"}, "unauthorized"),
    ):
        response = await client.post(url, json={"purpose": "transit"}, headers=headers)
        assert (response.status_code, response.json()["code"]) == (401, code)
    for content in (b"{", b'{"purpose": "transit", "count": 0}', b'{"purpose": "flying"}'):
        headers = {"content-type": "application/json"}
        response = await client.post(url, content=content, headers=headers, auth=holder.auth)
        assert (response.status_code, response.json()["code"]) == (400, "bad_request"), content


async def test_an_absurd_content_length_is_a_client_error(app: Litestar, client: httpx.AsyncClient, gate: Gate) -> None:
    """Not a number the hot path will parse (a 5,000-digit one would raise in int()): the routed handler's 400."""
    body = b'{"credential": "EC1:x"}'
    for length in (b"9" * 5000, b"12x"):
        headers = [(b"x-api-key", gate.api_key.encode()), (b"content-length", length), JSON_TYPE]
        sent = await asgi_call(app, headers, [{"type": "http.request", "body": body, "more_body": False}])
        assert sent[0]["status"] == 400, length[:8]
        assert b'"code":"bad_request"' in sent[1]["body"]
