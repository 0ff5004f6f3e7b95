"""What a bench run prints: one row per measured run as it ends, then the summary and the flags.

The flags are what a reader must look at (fresh credentials rejected, errors, a server that logged
errors); a run with any ends with exit status 1.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field

from loadtests.bench.client import Measurement
from loadtests.bench.histograms import SERVER_QUANTILE, HistogramCounts

# The bundle measurement after the rounds: this many credentials per request (the service's default
# ECARD_CREDENTIAL_BUNDLE_MAX), up to BUNDLE_REQUESTS requests for at most BUNDLE_SECONDS.
BUNDLE_SIZE = 20
BUNDLE_REQUESTS = 2_000
BUNDLE_SECONDS = 2.0
BUNDLE_CONNECTIONS = 10
# Issue 6's targets, quoted beside the figures in the summary.
TARGET_VERIFY_VS_NOOP = 0.40
TARGET_VERIFY_VS_NAIVE = 1.5
TARGET_ISSUE_RATE_PER_WORKER = 4_000
TARGET_BUNDLE_SERVER_MS = 2.0
# Issue 17's target: an SM2 verify within 2x the CPU of an Ed25519 one (measured per /v1/verify request).
TARGET_SM2_VERIFY_RATIO = 2.0
# Row labels of the service's verify, by issuer-key algorithm (loadtests/bench_verify.py --profile).
VERIFY_LABELS = {"verify": "Ed25519", "sm2": "SM2"}


@dataclass
class Row:
    """One measured run."""

    round: int
    target: str
    measured: Measurement
    outcomes: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    supplied: int = 0
    # The service's verify-handler histogram over the measured run (verify only: the others have none).
    server_histogram: HistogramCounts | None = None

    @property
    def server_quantile(self) -> float:
        """SERVER_QUANTILE of the server's histogram, seconds (inf: above its top bucket; NaN: none)."""
        return self.server_histogram.quantile(SERVER_QUANTILE) if self.server_histogram else math.nan


def cpu_per_request(measured: Measurement) -> float:
    """Server CPU per response, µs."""
    return measured.server_cpu / measured.requests * 1e6 if measured.requests else math.nan


def fmt_ms(value: float) -> str:
    """Milliseconds with two decimals, '-' for none."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def fmt_server_ms(seconds: float, top: float) -> str:
    """A histogram quantile in ms: '-' when nothing was observed, '>1000' when above the top bucket."""
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return f">{top * 1000:g}"
    return f"{seconds * 1000:.2f}"


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


class Report:
    """The rows as they come, the issuance measured, the flags; `summary` prints the end."""

    def __init__(self, connections: int, workers: int, rounds: int) -> None:
        self.connections = connections
        self.workers = workers
        self.rounds = rounds
        self.rows: list[Row] = []
        # By verify label ("verify": Ed25519, "sm2": SM2): the count=1 issuing runs, the bundle measurement.
        self.issuance: dict[str, list[Measurement]] = {}
        self.bundles: dict[str, Measurement] = {}
        self.flags: list[str] = []
        self._printed_columns = False

    @property
    def bundle_connections(self) -> int:
        """Connections the bundle measurement uses."""
        return min(self.connections, BUNDLE_CONNECTIONS)

    @property
    def cores_for_server(self) -> int:
        """Cores one server can use: one a worker, at most the machine's."""
        return min(self.workers, os.cpu_count() or 1)

    def add(self, row: Row) -> None:
        """Keep a measured run and print its row (the column heads before the first)."""
        self.rows.append(row)
        self._print_row(row)

    @staticmethod
    def _columns() -> str:
        return (
            f"{'round':>5}  {'target':<7} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv p99':>7}"
            f" {'errors':>6}"
            f" {'srv µs/req':>10} {'srv CPU':>7} {'cli µs/req':>10}"
        )

    def _print_row(self, row: Row) -> None:
        if not self._printed_columns:
            self._printed_columns = True
            print(self._columns())
        m = row.measured
        client_per = m.client_cpu / m.requests * 1e6 if m.requests else math.nan
        histogram = row.server_histogram
        server_p99 = fmt_server_ms(row.server_quantile, histogram.top) if histogram is not None else ""
        print(
            f"{row.round:>5}  {row.target:<7} {m.requests:>9,} {m.rate:>8,.0f} {fmt_ms(m.percentile_ms(0.50)):>7}"
            f" {fmt_ms(m.percentile_ms(0.99)):>7} {server_p99:>7} {m.errors:>6} {cpu_per_request(m):>10.0f}"
            f" {m.server_cpu / m.elapsed:>6.0%} {client_per:>10.0f}"
        )
        cores = self.cores_for_server
        if m.server_cpu < 0.8 * cores * m.elapsed:
            print(
                f"{'':>7}note: the server got {m.server_cpu / m.elapsed:.0%} CPU of {cores} core(s): the machine "
                "was busy or the client held it back; compare srv µs/req"
            )
        if histogram is not None and histogram.observations != m.requests:
            print(
                f"{'':>7}note: the server's histogram counted {histogram.observations:,} scans in this run, "
                f"the client {m.requests:,} answers"
            )
        if row.target in ("naive", *VERIFY_LABELS):
            breakdown = ", ".join(f"{key} {n:,}" for key, n in sorted(row.outcomes.items()))
            extra = []
            if m.exhausted:
                extra.append(f"credential supply ({row.supplied:,}) ran out after {m.elapsed:.1f} s")
            if row.stale:
                extra.append(f"{row.stale:,} stale credentials skipped")
            print(f"{'':>7}{row.target} results: {breakdown or 'none'}" + (f" ({'; '.join(extra)})" if extra else ""))
            rejected = {key: n for key, n in row.outcomes.items() if key != "accepted"}
            if rejected:
                self.flags.append(f"round {row.round}: fresh credentials not accepted: {rejected}")
        if m.errors:
            self.flags.append(
                f"round {row.round} {row.target}: {m.errors} errors (statuses {dict(m.statuses)}, "
                f"{m.transport_errors} transport, {m.timeouts} timed out)"
            )

    @staticmethod
    def _server_summary(rows: list[Row]) -> str:
        """'; srv p99 median [min, max]' of the rows' server histograms ('' when they have none)."""
        histograms = [row.server_histogram for row in rows if row.server_histogram is not None]
        values = [value for value in (row.server_quantile for row in rows) if not math.isnan(value)]
        if not histograms or not values:
            return ""
        top = histograms[0].top
        median, low, high = (fmt_server_ms(v, top) for v in (statistics.median(values), min(values), max(values)))
        return f"; srv p99 {median} ms [{low}, {high}]"

    def _keys(self, label: str) -> str:
        """' (SM2 keys)' beside a figure of a lane, '' for Ed25519 when it is the only one."""
        if label == "verify" and set(self.issuance) | set(self.bundles) <= {"verify"}:
            return ""
        return f" ({VERIFY_LABELS.get(label, label)} keys)"

    @staticmethod
    def _profiles(
        by_target: dict[str, list[Row]], issue_cpu: dict[str, float], bundle_cpu: dict[str, float]
    ) -> float | None:
        """Print the server CPU of each issuer-key algorithm side by side; the SM2/Ed25519 verify ratio, if both ran."""
        verify_cpu = {
            label: statistics.median(cpu_per_request(row.measured) for row in by_target[label])
            for label in VERIFY_LABELS
            if label in by_target
        }
        if "sm2" not in verify_cpu and "sm2" not in issue_cpu:
            return None
        print("server CPU per request by issuer key (median over the rounds):")
        for label, name in VERIFY_LABELS.items():
            figures = [
                f"{what} {values[label]:.0f} µs"
                for what, values in (
                    ("verify", verify_cpu),
                    ("issue count=1", issue_cpu),
                    ("bundle per credential", bundle_cpu),
                )
                if label in values
            ]
            if figures:
                print(f"  {name:<7} " + ", ".join(figures))
        ratios = [
            f"{what} {values['sm2'] / values['verify']:.2f}x"
            for what, values in (
                ("verify", verify_cpu),
                ("issue count=1", issue_cpu),
                ("bundle per credential", bundle_cpu),
            )
            if "sm2" in values and "verify" in values
        ]
        if ratios:
            print("  SM2 / Ed25519: " + ", ".join(ratios))
        if "sm2" in verify_cpu and "verify" in verify_cpu:
            return verify_cpu["sm2"] / verify_cpu["verify"]
        return None

    def summary(self) -> None:
        """The issuance figures, the medians over the rounds, the ratios beside issue 6's targets, the flags."""
        print()
        # Issue 6's figures, printed beside its targets at the end (None: not measured in this run).
        issue_per_worker: float | None = None
        bundle_ms: float | None = None
        noop_ratio: float | None = None
        naive_ratio: float | None = None
        # Per label: issue µs CPU per count=1 request, per credential in a bundle.
        issue_cpu: dict[str, float] = {}
        bundle_cpu: dict[str, float] = {}
        for label, runs in self.issuance.items():
            total = sum(m.requests for m in runs)
            seconds = sum(m.elapsed for m in runs)
            cpu = sum(m.server_cpu for m in runs)
            if not total or not seconds:
                continue
            issue_cpu[label] = cpu / total * 1e6
            print(
                f"issuance{self._keys(label)} (POST /v1/holder/credentials, count=1, {self.connections} connections, "
                f"raw client): {total:,} credentials in {seconds:.1f} s = {total / seconds:,.0f} req/s, "
                f"server {issue_cpu[label]:.0f} µs CPU per request"
            )
            if label == "verify":
                issue_per_worker = total / seconds / self.workers
        for label, bundles in self.bundles.items():
            per_bundle = cpu_per_request(bundles)
            bundle_cpu[label] = per_bundle / BUNDLE_SIZE
            print(
                f"issuance{self._keys(label)}, {BUNDLE_SIZE}-credential bundles "
                f"({self.bundle_connections} connections, raw client): {bundles.requests:,} requests at "
                f"{bundles.rate:,.0f} req/s, server {per_bundle:.0f} µs CPU per bundle "
                f"({per_bundle / BUNDLE_SIZE:.0f} µs per credential), "
                f"p50 {fmt_ms(bundles.percentile_ms(0.50))} ms, p99 {fmt_ms(bundles.percentile_ms(0.99))} ms"
            )
            if label == "verify":
                bundle_ms = per_bundle / 1000
        by_target: dict[str, list[Row]] = {}
        for row in self.rows:
            by_target.setdefault(row.target, []).append(row)
        if self.rounds > 1:
            print(f"over {self.rounds} rounds (median [min, max]):")
            for target, rows in by_target.items():
                rates = [row.measured.rate for row in rows]
                p50 = [row.measured.percentile_ms(0.5) for row in rows]
                p99 = [row.measured.percentile_ms(0.99) for row in rows]
                spread = (max(rates) - min(rates)) / statistics.median(rates) if rates else math.nan
                print(
                    f"  {target:<7} req/s {statistics.median(rates):>8,.0f} [{min(rates):,.0f}, {max(rates):,.0f}] "
                    f"spread {spread:.0%}; p50 {statistics.median(p50):.2f} ms; "
                    f"p99 {statistics.median(p99):.2f} ms [{min(p99):.2f}, {max(p99):.2f}]" + self._server_summary(rows)
                )
        if "noop" in by_target and "verify" in by_target:
            noop_rate = statistics.median(row.measured.rate for row in by_target["noop"])
            verify_rate = statistics.median(row.measured.rate for row in by_target["verify"])
            noop_ratio = verify_rate / noop_rate
            print(f"verify / no-op POST throughput: {noop_ratio:.0%}")
            noop_cpu = statistics.median(cpu_per_request(row.measured) for row in by_target["noop"])
            verify_cpu = statistics.median(cpu_per_request(row.measured) for row in by_target["verify"])
            print(
                f"server CPU per request: verify {verify_cpu:.0f} µs, no-op {noop_cpu:.0f} µs; at equal CPU, "
                f"verify would run at {noop_cpu / verify_cpu:.0%} of the no-op rate"
            )
        if "naive" in by_target and "verify" in by_target:
            naive_rate = statistics.median(row.measured.rate for row in by_target["naive"])
            verify_rate = statistics.median(row.measured.rate for row in by_target["verify"])
            naive_ratio = verify_rate / naive_rate
            naive_cpu = statistics.median(cpu_per_request(row.measured) for row in by_target["naive"])
            print(
                f"verify / naive reference throughput: {naive_ratio:.2f}x "
                f"(naive: cryptography + one redis-py SET NX per request, {naive_cpu:.0f} µs CPU)"
            )
        targets = [
            (f"verify / no-op POST throughput {noop_ratio:.0%}", f">= {TARGET_VERIFY_VS_NOOP:.0%}",
             noop_ratio >= TARGET_VERIFY_VS_NOOP) if noop_ratio is not None else None,
            (f"verify / naive reference {naive_ratio:.2f}x", f">= {TARGET_VERIFY_VS_NAIVE:g}x",
             naive_ratio >= TARGET_VERIFY_VS_NAIVE) if naive_ratio is not None else None,
            (f"issuance, count=1: {issue_per_worker:,.0f} req/s per worker",
             f">= {TARGET_ISSUE_RATE_PER_WORKER:,}", issue_per_worker >= TARGET_ISSUE_RATE_PER_WORKER)
            if issue_per_worker is not None else None,
            (f"{BUNDLE_SIZE}-credential bundle: {bundle_ms:.2f} ms server CPU", f"<= {TARGET_BUNDLE_SERVER_MS:g} ms",
             bundle_ms <= TARGET_BUNDLE_SERVER_MS) if bundle_ms is not None else None,
        ]  # fmt: skip
        sm2_ratio = self._profiles(by_target, issue_cpu, bundle_cpu)
        shown = [target for target in targets if target is not None]
        if shown:
            print("issue 6 targets (this run):")
            for figure, target, met in shown:
                print(f"  {figure} (asks {target}): {_met(met)}")
        if sm2_ratio is not None:
            print("issue 17 target (this run):")
            print(
                f"  SM2 / Ed25519 verify CPU per request {sm2_ratio:.2f}x (asks <= {TARGET_SM2_VERIFY_RATIO:g}x): "
                f"{_met(sm2_ratio <= TARGET_SM2_VERIFY_RATIO)}"
            )
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        print(f"load average {load} (after)")
        if self.flags:
            print("\nFLAGGED:")
            for flag in self.flags:
                print(f"  - {flag}")
