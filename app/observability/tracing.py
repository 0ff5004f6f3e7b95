"""OpenTelemetry tracing of requests: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set, then sampled.

One server span per HTTP request, made by app.server.request_observer in front of the hot paths, so a
scan answered on plain ASGI is traced like a routed request. The span is named by method and
route template and carries the request id; never the path or a header value, which can hold a
card number or a key. A `traceparent` from the caller continues its trace and its sampling decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from litestar.types import HTTPScope

    from app.settings import Settings

SERVICE_NAME = "ecard"
_PROPAGATED = (b"traceparent", b"tracestate")
_propagator = TraceContextTextMapPropagator()


def tracer_provider(settings: Settings) -> TracerProvider | None:
    """An OTLP/HTTP exporting provider when OTEL_EXPORTER_OTLP_ENDPOINT is set, else None (no tracing).

    The exporter reads the standard OTEL_EXPORTER_OTLP_* variables itself (endpoint, headers, certificate).
    """
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class RequestSpan:
    """A request's server span, current while the request is answered."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def end(self, method: str, route: str, status: int) -> None:
        """Name the span by its route (known once routed), record the answer's status, and end it."""
        otel_context.detach(self._token)
        span = self._span
        if span.is_recording():
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class RequestTracer:
    """Starts the server span of each request from a provider (OTLP in service, in-memory in tests)."""

    __slots__ = ("_provider", "_tracer")

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("app.server.request_observer")

    def start(self, scope: HTTPScope, request_id: str) -> RequestSpan:
        """The span of the request whose scope this is, child of the caller's `traceparent` if it sent one."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in _PROPAGATED
        }
        parent = _propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            scope["method"],
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"ecard.request_id": request_id, "http.request.method": scope["method"]},
        )
        return RequestSpan(span)

    def shutdown(self) -> None:
        """Send what is buffered and stop exporting."""
        self._provider.shutdown()
