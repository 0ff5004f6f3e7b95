"""OpenTelemetry: off by default; when on, one server span per request, hot paths included, with the request id."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from litestar import Litestar
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.observability.tracing import tracer_provider
from app.server.plugin import EcardPlugin
from app.settings import Settings
from tests import factories
from tests.conftest import make_settings, serve

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
async def traced(
    database_url: str, redis_url: str, redis_prefix: str, spans: InMemorySpanExporter
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its spans kept in memory, the test client's address (127.0.0.1) a trusted proxy."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = make_settings(database_url, redis_url, redis_prefix, trusted_proxies=("127.0.0.1",))
    app = Litestar(plugins=[EcardPlugin(settings, traces=provider)])
    async with serve(app) as client:
        yield client


def _span_of(spans: InMemorySpanExporter, request_id: str):  # type: ignore[no-untyped-def]
    [span] = [
        span for span in spans.get_finished_spans() if (span.attributes or {}).get("ecard.request_id") == request_id
    ]
    return span


async def test_a_scan_and_a_routed_request_each_make_a_span_with_their_request_id(
    traced: httpx.AsyncClient, admin_token: str, spans: InMemorySpanExporter
) -> None:
    holder = await factories.activated_holder(traced, admin_token, "510000")
    gate = await factories.new_gate(traced, admin_token, "510000", "transit", ["transit"])
    [credential] = await factories.credentials(traced, holder)
    spans.clear()
    scan = await traced.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
    assert scan.status_code == 200 and scan.json()["result"] == "accepted"
    card = await traced.get(f"/v1/operator/cards/{holder.card_id}", headers=factories.bearer(admin_token))
    assert card.status_code == 200

    verify_span = _span_of(spans, scan.headers["x-request-id"])
    assert verify_span.name == "POST /v1/verify" and verify_span.kind == SpanKind.SERVER
    assert verify_span.attributes["http.route"] == "/v1/verify"
    assert verify_span.attributes["http.response.status_code"] == 200
    routed_span = _span_of(spans, card.headers["x-request-id"])
    assert routed_span.name == "GET /v1/operator/cards/{card_id}"
    # Neither the path asked nor any header value is on a span.
    for span in (verify_span, routed_span):
        values = " ".join(str(value) for value in (span.attributes or {}).values())
        assert holder.card_id not in values and gate.api_key not in values and credential not in values


async def test_a_proxy_request_id_and_trace_are_continued(
    traced: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    headers = {"X-Request-Id": "lb-7f3e2a1c9b", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    response = await traced.get("/health", headers=headers)
    assert response.headers["x-request-id"] == "lb-7f3e2a1c9b"
    span = _span_of(spans, "lb-7f3e2a1c9b")
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    failed = await traced.get("/v1/nowhere")
    assert _span_of(spans, failed.headers["x-request-id"]).name == "GET unmatched"


async def test_a_server_error_marks_its_span(
    traced: httpx.AsyncClient, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.server import probes

    def broken() -> None:
        raise RuntimeError("probe failed")

    monkeypatch.setattr(probes, "Liveness", broken)
    response = await traced.get("/health")
    assert response.status_code == 500
    span = _span_of(spans, response.headers["x-request-id"])
    assert span.status.status_code == StatusCode.ERROR


def test_tracing_is_off_unless_an_otlp_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert Settings.from_env().otlp_endpoint == "" and tracer_provider(Settings.from_env()) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("ECARD_TRACE_SAMPLE_RATIO", "0.25")
    provider = tracer_provider(Settings.from_env())
    assert provider is not None
    try:
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
    finally:
        provider.shutdown()
    monkeypatch.setenv("ECARD_TRACE_SAMPLE_RATIO", "2")
    with pytest.raises(ValueError, match="between 0 and 1"):
        Settings.from_env()
