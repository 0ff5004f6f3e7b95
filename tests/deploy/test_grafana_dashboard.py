"""The Grafana dashboard parses, and every metric its panels query is one the service exports."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import REGISTRY

from app.observability import metrics
from app.settings import PROJECT_ROOT

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "ecard.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """The names of the series app.observability.metrics registers, as Prometheus stores them (with their suffixes)."""
    assert metrics.VERIFY_SECONDS is not None  # imported for its registrations
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("ecard_"):
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def test_every_panel_queries_metrics_the_service_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    series = exported_series()
    assert {
        "ecard_http_requests_total",
        "ecard_mirror_rebuild_cards_done",
        "ecard_mirror_rebuild_cards_total",
    } <= series
    shown = panels(dashboard)
    assert len(shown) >= 12
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried: set[str] = set()
    for panel in shown:
        assert panel["title"] and panel["targets"] and {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\becard_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= series, (panel["title"], names - series)
            queried |= names
    # Each family the service exports is on the dashboard (a new metric gets a panel).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in series}
    shown_families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    assert families <= shown_families, families - shown_families
