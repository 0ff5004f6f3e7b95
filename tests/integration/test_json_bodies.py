"""JSON request bodies are judged the same everywhere: 415 unless `application/json`, 400 for a key given twice or
nesting too deep, on the routed handlers and on the hot paths (which hand such a body on, having done nothing)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.domain import errors
from app.http.json_bodies import decode_json_body, is_json_content_type
from app.http.problems import from_domain_error
from tests import factories
from tests.factories import Gate, Holder, bearer, problem

JSON = {"content-type": "application/json"}
ACTIVATION = b'{"card_number":"D12345678","activation_code":"1234-5678","device_public_key":"%s"}'


@pytest.fixture
async def gate(client: httpx.AsyncClient, admin_token: str) -> Gate:
    """A transit gate of this test alone: the session's gate keeps its rate budget for the tests that use it."""
    return await factories.new_gate(client, admin_token, "510000", "transit", ["transit"])


def nested(depth: int) -> bytes:
    """`{"card_number": [[…]]}`: depth levels in under 2 KB, deep enough to exhaust a recursive decoder."""
    return b'{"card_number":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("application/json", True),
        ("Application/JSON; charset=UTF-8", True),
        ('application/json; charset="utf-8"', True),
        ("application/json;charset=utf8;foo=bar", True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("text/plain; charset=utf-8", False),
        ("application/x-www-form-urlencoded", False),
        ("application/merge-patch+json", False),
        ("application/jsonp", False),
        ("", False),
    ],
)
def test_json_content_types(value: str, accepted: bool) -> None:
    assert is_json_content_type(value) is accepted
    assert is_json_content_type(value.encode()) is accepted


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"a":1,"a":1}', "'a' more than once"),
        (b'{"a":1,"\\u0061":2}', "'a' more than once"),
        (b'{"x":[{"b":1},{"b":2,"c":{"d":1,"d":2}}]}', "'d' more than once"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"a":1', "not valid JSON"),
        (b'"\\ud800"', "not valid JSON"),
        (b"NaN", "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
    ],
)
def test_bodies_refused_with_a_precise_detail(body: bytes, detail: str) -> None:
    with pytest.raises(errors.Invalid) as refused:
        decode_json_body(body)
    assert refused.value.code == "bad_request"
    assert detail in refused.value.detail
    assert from_domain_error(refused.value).status_code == 400


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert decode_json_body(b'{"a":{"a":1},"b":[{"a":2},{"a":3}]}') == {"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]}


@pytest.mark.parametrize("depth", [1_000, 990])
async def test_deep_nesting_is_a_400_without_authentication(client: httpx.AsyncClient, depth: int) -> None:
    response = await client.post("/v1/holder/activation", content=nested(depth), headers=JSON)
    body = problem(response, 400)
    assert body["code"] == "bad_request"
    assert "nested too deeply" in body["detail"]


async def test_deep_nesting_on_verify_is_a_400_both_ways(client: httpx.AsyncClient, gate: Gate) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    for headers in (gate.headers, {"x-api-key": "unknown"}, {}):
        response = await client.post("/v1/verify", content=deep, headers={**headers, **JSON})
        assert "nested too deeply" in problem(response, 400)["detail"], headers


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"])
async def test_activation_refuses_other_media_types(client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    device = factories.DeviceKey()
    body = ACTIVATION % device.public_key.encode()
    response = await client.post("/v1/holder/activation", content=body, headers=headers, auth=device.auth())
    assert problem(response, 415)["code"] == "unsupported_media_type"
    # The same body as JSON is read (and refused for its made-up code: 401, not 415).
    charset = await client.post(
        "/v1/holder/activation",
        content=body,
        headers={"content-type": "application/json; charset=utf-8"},
        auth=device.auth(),
    )
    assert problem(charset, 401)["code"] == "activation_failed"


async def test_a_scan_sent_as_text_plain_is_refused_and_consumes_nothing(
    client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    [credential] = await factories.credentials(client, holder)
    body = b'{"credential":"' + credential.encode() + b'"}'
    for content_type in ("text/plain", "application/json; charset=latin-1", "application/vnd.ecard+json"):
        response = await client.post("/v1/verify", content=body, headers={**gate.headers, "content-type": content_type})
        assert problem(response, 415)["code"] == "unsupported_media_type", content_type
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


@pytest.mark.parametrize(
    "template",
    [
        b'{"credential":"EC1:JUNK","credential":"%s"}',
        b'{"credential":"%s","credential":"EC1:JUNK"}',
        b'{"cred\\u0065ntial":"EC1:JUNK","credential":"%s"}',
        b'{"credential":"%s","credential":"%s"}',
    ],
    ids=["junk-first", "junk-last", "escaped", "same-twice"],
)
async def test_a_duplicate_key_in_a_scan_is_a_400_both_ways(
    client: httpx.AsyncClient, holder: Holder, gate: Gate, template: bytes
) -> None:
    [credential] = await factories.credentials(client, holder)
    body = template.replace(b"%s", credential.encode())
    hot = await client.post("/v1/verify", content=body, headers={**gate.headers, **JSON})
    assert "'credential' more than once" in problem(hot, 400)["detail"]

    async def chunks() -> AsyncIterator[bytes]:
        yield body  # no Content-Length: the routed handler decides

    routed = await client.post("/v1/verify", content=chunks(), headers={**gate.headers, **JSON})
    assert problem(routed, 400) == problem(hot, 400)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


async def test_a_duplicate_key_deep_in_a_batch_is_a_400(client: httpx.AsyncClient, holder: Holder, gate: Gate) -> None:
    [credential] = await factories.credentials(client, holder)
    scan = b'{"credential":"%s","scanned_at":"2026-01-01T00:00:00Z","scanned_at":"2026-01-02T00:00:00Z"}'
    body = b'{"scans":[' + scan.replace(b"%s", credential.encode()) + b"]}"
    response = await client.post("/v1/verify/batch", content=body, headers={**gate.headers, **JSON})
    assert "'scanned_at' more than once" in problem(response, 400)["detail"]


async def test_issuing_refuses_a_duplicate_key_and_text_plain(client: httpx.AsyncClient, holder: Holder) -> None:
    auth = holder.auth
    body = b'{"purpose":"medical","purpose":"transit","count":1}'
    duplicate = await client.post("/v1/holder/credentials", content=body, headers=JSON, auth=auth)
    assert "'purpose' more than once" in problem(duplicate, 400)["detail"]
    plain = await client.post(
        "/v1/holder/credentials",
        content=b'{"purpose":"transit","count":1}',
        headers={"content-type": "text/plain"},
        auth=auth,
    )
    assert problem(plain, 415)["code"] == "unsupported_media_type"
    issued = await client.post(
        "/v1/holder/credentials", content=b'{"purpose":"transit","count":1}', headers=JSON, auth=auth
    )
    assert issued.status_code == 200, issued.text


async def test_an_empty_body_needs_no_content_type(client: httpx.AsyncClient, admin_token: str) -> None:
    """A route whose body is required says the body is missing (400), whatever the media type."""
    response = await client.post("/v1/operator/regions", headers=bearer(admin_token))
    assert problem(response, 400)["code"] == "bad_request"
