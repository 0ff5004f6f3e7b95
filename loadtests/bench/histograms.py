"""The service's own latency histogram, read from its /metrics page (Prometheus text format).

The bench scrapes it right before and right after a measured run; the difference of the cumulative
bucket counts gives the server's p99 for that run, interpolated as `histogram_quantile` does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from loadtests.bench import HOST

if TYPE_CHECKING:
    from loadtests.bench.processes import ServerProcess

METRICS_PATH = "/metrics"
# The service's verify-handler histogram (app/observability/metrics.py) and the quantile the reports show from it.
VERIFY_HISTOGRAM = "ecard_verify_duration_seconds"
SERVER_QUANTILE = 0.99
METRICS_TIMEOUT = 10.0

_LE_LABEL = re.compile(r'(?:^|,)le="([^"]+)"')


@dataclass(frozen=True)
class HistogramCounts:
    """Cumulative bucket counts of one Prometheus histogram: (upper bound in s, count), ascending, +Inf last."""

    buckets: tuple[tuple[float, float], ...]

    @property
    def observations(self) -> int:
        """Observations counted (the +Inf bucket)."""
        return int(self.buckets[-1][1]) if self.buckets else 0

    @property
    def top(self) -> float:
        """The largest finite bucket bound, seconds (NaN without one)."""
        finite = [bound for bound, _count in self.buckets if bound != math.inf]
        return finite[-1] if finite else math.nan

    def since(self, earlier: HistogramCounts) -> HistogramCounts:
        """The observations made after `earlier` was scraped (kept cumulative, like Prometheus keeps them)."""
        before = dict(earlier.buckets)
        buckets, running = [], 0.0
        for bound, count in self.buckets:
            running = max(running, count - before.get(bound, 0.0))
            buckets.append((bound, running))
        return HistogramCounts(tuple(buckets))

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds as Prometheus's histogram_quantile computes it.

        Linear interpolation inside the bucket holding rank q·observations (from 0 in the first
        bucket); math.inf when the rank lies in the +Inf bucket (above `top`), NaN when nothing
        was observed.
        """
        buckets = self.buckets
        if len(buckets) < 2 or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
            return math.nan
        rank = q * buckets[-1][1]
        start, below = 0.0, 0.0
        for bound, count in buckets[:-1]:
            if count >= rank:
                if bound <= 0:
                    return bound
                return start + (bound - start) * (rank - below) / (count - below)
            start, below = bound, count
        return math.inf


def parse_histogram(text: str, name: str) -> HistogramCounts:
    """The `name` histogram's cumulative bucket counts from a /metrics page (no buckets: it is not there)."""
    prefix = f"{name}_bucket{{"
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, rest = line[len(prefix) :].partition("} ")
        match = _LE_LABEL.search(labels)
        fields = rest.split()
        if match is None or not fields:
            continue
        bound = math.inf if match.group(1) == "+Inf" else float(match.group(1))
        # Several series (other labels) add up; the bench's histogram has none.
        counts[bound] = counts.get(bound, 0.0) + float(fields[0])
    return HistogramCounts(tuple(sorted(counts.items())))


async def scrape_histogram(server: ServerProcess, name: str) -> HistogramCounts | None:
    """The histogram from the server's /metrics now, or None when it cannot be read."""
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}", timeout=METRICS_TIMEOUT) as client:
            response = await client.get(METRICS_PATH)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    counts = parse_histogram(response.text, name)
    return counts if counts.buckets else None
