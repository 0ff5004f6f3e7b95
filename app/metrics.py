"""Prometheus metrics of the verify path: what it costs and what it answers.

Two instruments, bound to their labels once, so a scan pays two in-process updates (about two
microseconds), not a middleware. With several workers set PROMETHEUS_MULTIPROC_DIR to an empty
directory (cleared at every start): each worker writes there and `/metrics` sums them.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
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

_results: dict[str, Counter] = {}


def count_result(result: str) -> None:
    """One more verification with this result (the label child is created once per result)."""
    child = _results.get(result)
    if child is None:
        child = _results[result] = VERIFICATIONS.labels(result)
    child.inc()


def exposition() -> tuple[bytes, str]:
    """The metrics in the text format, summed over workers in multiprocess mode; and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
