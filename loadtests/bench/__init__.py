"""The benchmark harness behind `python -m loadtests.bench_verify`, `loadtests.headless` and `loadtests.prepare`.

One module per concern: `client` (a raw HTTP/1.1 load generator and what a run records),
`processes` (uvicorn servers, the run's workspace, the CLI), `histograms` (the service's own
latency histogram from /metrics), `preparation` (test data and credentials through the public
API), `reporting` (the table and the summary), `calibration` (the line that makes figures from
two machines comparable), `loop_lag` (an event-loop lag probe for a served app). This module holds
what all of them share, and imports none of them.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
# Every server the harness starts listens on loopback only.
HOST = "127.0.0.1"


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""
