"""Prometheus metrics: every route, the verify path, issuing, the event drain and the status mirror.

Instruments are bound to their labels once, so a request pays a few in-process updates (about a
microsecond each), not a middleware. With several workers set PROMETHEUS_MULTIPROC_DIR to an empty
directory (cleared at every start): each worker (and an `ecard events drain` or a mirror rebuild
given the same directory) writes there and `/metrics` sums them; gauges of shared state keep the
most recent value written by any process.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Fine below 10 ms, where a healthy verify lives; coarse above, where only outages go.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

VERIFY_SECONDS = Histogram(
    "ecard_verify_duration_seconds",
    "Time in the verify handler per scan (decision, store round trip, disclosure), seconds",
    buckets=LATENCY_BUCKETS,
)
VERIFICATIONS = Counter(
    "ecard_verifications", "Answered verifications by result (accepted, or the rejection reason)", ["result"]
)
REFUSED = Counter(
    "ecard_verify_refusals", "Verify requests refused before a decision (rate_limited, unavailable)", ["reason"]
)
REFUSED_RATE_LIMITED = REFUSED.labels("rate_limited")
REFUSED_UNAVAILABLE = REFUSED.labels("unavailable")
# The store answered too late: the scan may have run (its answer is then marked undelivered).
REFUSED_OUTCOME_UNKNOWN = REFUSED.labels("outcome_unknown")

# Routes: what a request cost from its first byte in to its answer, by route template (never the path).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
HTTP_REQUESTS = Counter(
    "ecard_http_requests", "Answered HTTP requests by method, route template and status", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "ecard_http_request_duration_seconds",
    "Time to answer an HTTP request by method and route template, seconds",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)

# Issuing: every open QR screen asks twice a minute, so it outnumbers verification.
CREDENTIALS_ISSUED = Counter("ecard_credentials_issued", "Credentials signed and handed out, by purpose", ["purpose"])
BUNDLE_SIZE = Histogram(
    "ecard_credential_bundle_size",
    "Credentials per issuing request (a bundle of consecutive windows, or one)",
    buckets=(1, 2, 5, 10, 20, 50),
)
SIGNING_SECONDS = Histogram(
    "ecard_credential_signing_duration_seconds",
    "Time to build and sign one issuing request's credentials, seconds",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1),
)

# The event drain (verification events from the Redis stream into the database).
EVENT_BACKLOG = Gauge(
    "ecard_event_stream_backlog", "Verification events in the stream not yet drained", multiprocess_mode="mostrecent"
)
EVENT_PENDING = Gauge(
    "ecard_event_stream_pending",
    "Of the backlog, events a drain received and has not acknowledged",
    multiprocess_mode="mostrecent",
)
DRAIN_LAG = Gauge(
    "ecard_event_drain_lag_seconds",
    "Age of the oldest event in the batch the drain stored last, seconds",
    multiprocess_mode="mostrecent",
)
DRAIN_BATCH = Histogram(
    "ecard_event_drain_batch_size", "Events per batch the drain stored", buckets=(1, 10, 50, 100, 250, 500, 1000)
)
DRAINED = Counter("ecard_events_drained", "Verification events stored in the database by the drain")

# The status mirror: committed changes waiting to reach it, and a rebuild's progress.
OUTBOX_PENDING = Gauge(
    "ecard_mirror_outbox_pending",
    "Committed card changes waiting in the outbox for the status mirror",
    multiprocess_mode="mostrecent",
)
MIRROR_REBUILD_DONE = Gauge(
    "ecard_mirror_rebuild_cards_done", "Cards the running mirror rebuild has written", multiprocess_mode="mostrecent"
)
MIRROR_REBUILD_TOTAL = Gauge(
    "ecard_mirror_rebuild_cards_total", "Cards the running mirror rebuild has to write", multiprocess_mode="mostrecent"
)

_results: dict[str, Counter] = {}
_requests: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_issued: dict[str, Counter] = {}


def count_result(result: str) -> None:
    """One more verification with this result (the label child is created once per result)."""
    child = _results.get(result)
    if child is None:
        child = _results[result] = VERIFICATIONS.labels(result)
    child.inc()


def count_request(method: str, route: str, status: int, seconds: float) -> None:
    """One more answered request of this route (children bound once per method, route and status)."""
    key = (method, route, status)
    children = _requests.get(key)
    if children is None:
        children = _requests[key] = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_SECONDS.labels(method, route),
        )
    children[0].inc()
    children[1].observe(seconds)


def count_issued(purpose: str, count: int, seconds: float) -> None:
    """An issuing request's credentials: how many, of which purpose, and what signing them took."""
    child = _issued.get(purpose)
    if child is None:
        child = _issued[purpose] = CREDENTIALS_ISSUED.labels(purpose)
    child.inc(count)
    BUNDLE_SIZE.observe(count)
    SIGNING_SECONDS.observe(seconds)


def count_drained(batch: int, lag_seconds: float | None) -> None:
    """A batch the event drain stored, and how old its oldest event was."""
    DRAIN_BATCH.observe(batch)
    DRAINED.inc(batch)
    if lag_seconds is not None:
        DRAIN_LAG.set(max(lag_seconds, 0.0))


def rebuild_progress(done: int, total: int) -> None:
    """Where a rebuild of the status mirror from the database stands (call it every batch or so)."""
    MIRROR_REBUILD_DONE.set(done)
    MIRROR_REBUILD_TOTAL.set(total)


def exposition() -> tuple[bytes, str]:
    """The metrics in the text format, summed over workers in multiprocess mode; and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
