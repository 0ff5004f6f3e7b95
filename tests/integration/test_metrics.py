"""Prometheus metrics of the verify path: results by reason and the latency histogram move with the scans."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import httpx

from app.db.clock import utcnow
from app.db.models import MirrorChange
from app.observability import metrics
from app.server.context import ServiceContext
from app.settings import PROJECT_ROOT
from tests import factories
from tests.factories import Gate, Holder


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_results_and_time_the_verify_path(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate
) -> None:
    before = (await client.get("/metrics")).text
    other = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    [credential] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"
    assert (await factories.verify(client, other, credential))["reason"] == "replayed"
    assert (await factories.verify(client, gate, "EC1:0"))["reason"] == "malformed"
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    for result in ("accepted", "replayed", "malformed"):
        name, labels = "ecard_verifications_total", f'{{result="{result}"}}'
        assert _sample(after, name, labels) - _sample(before, name, labels) >= 1, result
    assert (
        _sample(after, "ecard_verify_duration_seconds_count") - _sample(before, "ecard_verify_duration_seconds_count")
        >= 3
    )
    # Buckets are cumulative, and nothing personal or secret is in the exposition.
    assert 'ecard_verify_duration_seconds_bucket{le="0.003"}' in after
    assert gate.api_key not in after and holder.card_number not in after


async def _scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_every_route_is_counted_and_timed_by_template_and_status(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate
) -> None:
    before = await _scrape(client)
    [credential] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"  # answered on the hot path
    routed = await client.post(
        "/v1/verify", json={"credential": credential}, headers={**gate.headers, "Content-Type": "application/json; a=b"}
    )
    assert routed.status_code == 200  # the same request, routed
    missing = await client.get(f"/v1/operator/cards/{uuid.uuid4()}", headers=factories.bearer(admin_token))
    assert missing.status_code == 404
    assert (await client.get(f"/v1/nowhere/{holder.card_number}")).status_code == 404
    after = await _scrape(client)

    def moved(name: str, labels: str) -> float:
        return _sample(after, name, labels) - _sample(before, name, labels)

    requests = "ecard_http_requests_total"
    assert moved(requests, '{method="POST",route="/v1/verify",status="200"}') == 2
    assert moved(requests, '{method="POST",route="/v1/holder/credentials",status="200"}') == 1
    assert moved(requests, '{method="GET",route="/v1/operator/cards/{card_id}",status="404"}') == 1
    assert moved(requests, '{method="GET",route="unmatched",status="404"}') == 1
    assert moved("ecard_http_request_duration_seconds_count", '{method="POST",route="/v1/verify"}') == 2
    assert 'ecard_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/verify"}' in after
    assert holder.card_number not in after and gate.api_key not in after


async def test_issuing_counts_credentials_bundles_and_signing_time(client: httpx.AsyncClient, holder: Holder) -> None:
    before = await _scrape(client)
    await factories.credentials(client, holder, count=3)
    await factories.credentials(client, holder)
    after = await _scrape(client)
    issued = '{purpose="transit"}'
    assert (
        _sample(after, "ecard_credentials_issued_total", issued)
        - _sample(before, "ecard_credentials_issued_total", issued)
        == 4
    )
    for name in ("ecard_credential_bundle_size_count", "ecard_credential_signing_duration_seconds_count"):
        assert _sample(after, name) - _sample(before, name) == 2, name
    assert _sample(after, "ecard_credential_bundle_size_sum") - _sample(before, "ecard_credential_bundle_size_sum") == 4


async def test_the_event_drain_reports_backlog_lag_and_batches(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate
) -> None:
    drain = context.event_drain(block_ms=0, claim_idle_ms=0)
    while await drain.run_once():  # what earlier tests left
        pass
    assert _sample(await _scrape(client), "ecard_event_stream_backlog") == 0
    for credential in await factories.credentials(client, holder, count=2):
        await factories.verify(client, gate, credential)
    waiting = await _scrape(client)
    assert _sample(waiting, "ecard_event_stream_backlog") >= 2
    await asyncio.sleep(0.05)
    assert await drain.run_once() >= 2
    after = await _scrape(client)
    assert _sample(after, "ecard_event_stream_backlog") == 0 and _sample(after, "ecard_event_stream_pending") == 0
    assert (
        _sample(after, "ecard_event_drain_batch_size_count") - _sample(waiting, "ecard_event_drain_batch_size_count")
        == 1
    )
    assert _sample(after, "ecard_events_drained_total") - _sample(waiting, "ecard_events_drained_total") >= 2
    # The oldest event of that batch had waited at least the pause above, and not for long.
    assert 0.05 <= _sample(after, "ecard_event_drain_lag_seconds") < 60


async def test_the_mirror_outbox_and_a_rebuild_are_gauged(client: httpx.AsyncClient, context: ServiceContext) -> None:
    async with context.sessions() as session:
        # Dated ahead, so the outbox applier leaves it alone while the test reads the gauge.
        change = MirrorChange(ecard_id=uuid.uuid4(), created_at=utcnow() + timedelta(hours=1))
        session.add(change)
        await session.commit()
        queued = _sample(await _scrape(client), "ecard_mirror_outbox_pending")
        await session.delete(change)
        await session.commit()
    assert queued - _sample(await _scrape(client), "ecard_mirror_outbox_pending") == 1

    metrics.rebuild_progress(1_500, 90_000)
    text = await _scrape(client)
    assert _sample(text, "ecard_mirror_rebuild_cards_done") == 1_500
    assert _sample(text, "ecard_mirror_rebuild_cards_total") == 90_000


_WORKER = """
import sys
from app.observability import metrics
metrics.count_request("POST", "/v1/verify", 200, 0.002)
metrics.count_issued("transit", 20, 0.001)
metrics.rebuild_progress(int(sys.argv[1]), 10)
"""


def test_multiprocess_mode_sums_the_workers(tmp_path: Path) -> None:
    """As `make serve` runs it: each worker writes to PROMETHEUS_MULTIPROC_DIR, `/metrics` sums them."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    for done in ("3", "7"):
        subprocess.run([sys.executable, "-c", _WORKER, done], env=env, check=True, timeout=60)
    reader = "from app.observability import metrics; print(metrics.exposition()[0].decode())"
    text = subprocess.run(
        [sys.executable, "-c", reader], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    assert _sample(text, "ecard_http_requests_total", '{method="POST",route="/v1/verify",status="200"}') == 2
    assert _sample(text, "ecard_credentials_issued_total", '{purpose="transit"}') == 40
    assert _sample(text, "ecard_credential_bundle_size_count") == 2
    assert _sample(text, "ecard_mirror_rebuild_cards_done") == 7  # the most recent value written
