"""Prometheus metrics of the verify path: results by reason and the latency histogram move with the scans."""

from __future__ import annotations

import re

import httpx

from tests import factories
from tests.factories import Gate, Holder


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.MULTILINE)
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
