"""The service catalogue: loaded by a command, listed publicly, and asked per region, by holders and by terminals.

The query tests load the shipped catalogue into the session's database of each backend; the
command tests run `litestar ecard catalog load` as a subprocess on a fresh migrated database of
each backend, with an app serving that database to show what clients see before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.db.models import AuditEvent, CatalogService, CatalogVersion, RegionService
from app.domain.audit.services import Actor
from app.domain.catalog.document import read_catalog, read_regions
from app.domain.catalog.services import DEFAULT_REGIONS_FILE, DEFAULT_SERVICES_FILE, load_catalog
from app.domain.operators.services import Role
from app.server.context import ServiceContext
from app.settings import PROJECT_ROOT
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database, operator_token, serve
from tests.factories import bearer, problem

VENV_BIN = Path(sys.executable).parent
SICHUAN, CHONGQING, GUANGDONG, HAINAN = "510000", "500000", "440000", "460000"
EXTRA_REGIONS = {HAINAN: "海南省"}
ALL_PURPOSES = ["general", "library", "medical", "park", "transit"]
SHIPPED: dict[str, Any] = json.loads(DEFAULT_SERVICES_FILE.read_text(encoding="utf-8"))


# --- helpers ---------------------------------------------------------------------------------


async def get_json(client: httpx.AsyncClient, url: str, **kwargs: Any) -> Any:
    """The JSON body of a 200 answer."""
    response = await client.get(url, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def codes(reach: dict[str, Any]) -> set[str]:
    """The service codes of a reach answer."""
    return {item["code"] for item in reach["services"]}


def usable(reach: dict[str, Any]) -> set[str]:
    """Every purpose through which some listed service is reached."""
    return {purpose for item in reach["services"] for purpose in item["usable_purposes"]}


def assert_consistent(reach: dict[str, Any]) -> None:
    """Each service is reached only through purposes the answer allows and the service lists."""
    for item in reach["services"]:
        assert item["usable_purposes"], item["code"]
        assert set(item["usable_purposes"]) <= set(reach["purposes"]) & set(item["purposes"]), item["code"]
        assert item["application_type"] != "benefit_payout", "no credential reaches a payout to the physical card"


async def register_regions(client: httpx.AsyncClient, token: str, regions: dict[str, str]) -> None:
    """Register regions through the operator API (already registered is fine)."""
    for code, name in regions.items():
        response = await client.post("/v1/operator/regions", json={"code": code, "name": name}, headers=bearer(token))
        assert response.status_code in (201, 409), response.text


# --- the shipped catalogue in the session's database -----------------------------------------


@pytest.fixture(scope="module")
async def catalog(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> None:
    """The shipped catalogue loaded (once per database: loading it again changes nothing), Hainan registered."""
    await register_regions(client, admin_token, EXTRA_REGIONS)
    loaded = read_catalog(DEFAULT_SERVICES_FILE)
    async with context.sessions() as session:
        await load_catalog(session, Actor.command("test"), loaded, read_regions(DEFAULT_REGIONS_FILE, loaded))


@pytest.mark.usefixtures("catalog")
async def test_the_catalogue_lists_the_95_hr_and_social_security_services_with_provenance(
    client: httpx.AsyncClient,
) -> None:
    hrss = await get_json(client, "/v1/catalog/services", params={"domain": "hrss"})
    assert len(hrss) == 95
    livelihood = await get_json(client, "/v1/catalog/services", params={"domain": "livelihood"})
    assert len(livelihood) == len(SHIPPED["services"]) - 95
    every = await get_json(client, "/v1/catalog/services")
    assert [item["code"] for item in every] == sorted(entry["code"] for entry in SHIPPED["services"])
    assert {item["provenance"]["status"] for item in every} == {"confirmed", "illustrative"}

    summary = await get_json(client, "/v1/catalog")
    assert summary["loaded"] is True
    assert summary["version"] == SHIPPED["version"]
    assert summary["counts"]["hrss"] == 95
    assert summary["counts"]["confirmed"] + summary["counts"]["illustrative"] == len(every)
    assert {group["name_zh"] for group in summary["usage_groups"]} == {
        "身份凭证用卡",
        "社保缴费凭卡",
        "工伤结算持卡",
        "补贴待遇进卡",
    }
    assert len(summary["application_types"]) == 7


@pytest.mark.usefixtures("catalog")
async def test_confirmed_entries_carry_their_sources(client: httpx.AsyncClient) -> None:
    sources = {source["id"]: source for source in (await get_json(client, "/v1/catalog"))["sources"]}
    every = await get_json(client, "/v1/catalog/services")
    confirmed = [item for item in every if item["provenance"]["status"] == "confirmed"]
    assert confirmed
    for item in confirmed:
        assert item["provenance"]["source"] in sources, item["code"]
    for item in every:
        if item["provenance"]["status"] == "illustrative":
            assert item["provenance"]["source"] is None
            assert "not available offline" in item["provenance"]["note"]
    enrolment = await get_json(client, "/v1/catalog/services/HRSS-SI-001")
    assert enrolment["name_zh"] == "办理参保"
    assert enrolment["provenance"]["source"] == "xinhua-2022-03"
    assert sources["xinhua-2022-03"]["url"] == "m.igdzc.com/guonei/20220302/0228682.html"


@pytest.mark.usefixtures("catalog")
async def test_the_list_filters_by_domain_category_and_application_type(client: httpx.AsyncClient) -> None:
    work_injury = await get_json(
        client,
        "/v1/catalog/services",
        params={"domain": "hrss", "category": "work_injury_insurance", "application_type": "medical_settlement"},
    )
    assert work_injury and all(item["purposes"] == ["medical"] for item in work_injury)
    assert all(item["business_types"] == ["hospital"] or "hospital" in item["business_types"] for item in work_injury)
    contributions = await get_json(client, "/v1/catalog/services", params={"application_type": "contribution_payment"})
    assert {item["domain"] for item in contributions} == {"hrss", "livelihood"}
    assert await get_json(client, "/v1/catalog/services", params={"category": "no_such_category"}) == []
    problem(await client.get("/v1/catalog/services", params={"domain": "mars"}), 400)
    problem(await client.get("/v1/catalog/services", params={"application_type": "lottery"}), 400)


@pytest.mark.usefixtures("catalog")
async def test_benefit_payouts_go_to_the_physical_card_only_and_no_credential_reaches_them(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    payouts = await get_json(client, "/v1/catalog/services", params={"application_type": "benefit_payout"})
    assert {item["domain"] for item in payouts} == {"hrss", "livelihood"}
    for item in payouts:
        assert item["forms"] == ["physical"]
        assert item["purposes"] == []
    payout_codes = {item["code"] for item in payouts}
    office = await factories.new_gate(client, admin_token, SICHUAN, "hrss_office", ALL_PURPOSES)
    for reach in (
        await get_json(client, f"/v1/regions/{SICHUAN}/services"),
        await get_json(client, "/v1/terminal/services", headers=office.headers),
    ):
        assert not codes(reach) & payout_codes


@pytest.mark.usefixtures("catalog")
async def test_one_service_by_its_code(client: httpx.AsyncClient) -> None:
    pension = await get_json(client, "/v1/catalog/services/HRSS-PEN-001")
    assert pension["name_zh"] == "养老金领取"
    assert pension["application_type"] == "benefit_payout"
    assert pension["forms"] == ["physical"]
    problem(await client.get("/v1/catalog/services/HRSS-XXX-999"), 404)


@pytest.mark.usefixtures("catalog")
async def test_a_region_lists_what_its_own_cards_may_do(client: httpx.AsyncClient) -> None:
    reach = await get_json(client, f"/v1/regions/{SICHUAN}/services")
    assert reach["region"] == reach["card_region"] == SICHUAN
    assert reach["catalog_version"] == SHIPPED["version"]
    assert reach["purposes"] == ALL_PURPOSES
    assert usable(reach) == set(ALL_PURPOSES)
    assert {"HRSS-SI-001", "HRSS-WIN-001", "LIVE-TRN-001", "LIVE-CUL-002", "LIVE-MED-001"} <= codes(reach)
    assert "LIVE-TOUR-002" not in codes(reach), "the Hainan-Guangdong annual card is not offered in Sichuan"
    hrss = [item for item in reach["services"] if item["domain"] == "hrss"]
    assert len(hrss) == 95 - sum(
        1 for entry in SHIPPED["services"] if entry["domain"] == "hrss" and not entry["purposes"]
    )
    assert_consistent(reach)

    transit = await get_json(client, f"/v1/regions/{SICHUAN}/services", params={"purpose": "transit"})
    assert transit["purposes"] == ["transit"]
    assert transit["services"] and usable(transit) == {"transit"}
    assert "LIVE-TRN-001" in codes(transit)
    assert not any(item["domain"] == "hrss" for item in transit["services"])


@pytest.mark.usefixtures("catalog")
async def test_a_chongqing_card_in_sichuan_reaches_general_medical_and_library_services_not_transit(
    client: httpx.AsyncClient,
) -> None:
    reach = await get_json(client, f"/v1/regions/{SICHUAN}/services", params={"card_region": CHONGQING})
    assert reach["card_region"] == CHONGQING
    assert reach["purposes"] == ["general", "library", "medical"]
    assert usable(reach) == {"general", "library", "medical"}
    found = codes(reach)
    assert {"HRSS-SI-001", "HRSS-EMP-001", "LIVE-MED-001", "LIVE-CUL-001", "LIVE-CUL-002"} <= found
    assert not {"LIVE-TRN-001", "LIVE-TRN-002", "LIVE-TOUR-001"} & found
    assert_consistent(reach)
    none = await get_json(
        client, f"/v1/regions/{SICHUAN}/services", params={"card_region": CHONGQING, "purpose": "transit"}
    )
    assert none["purposes"] == [] and none["services"] == []


@pytest.mark.usefixtures("catalog")
async def test_a_hainan_card_in_guangdong_reaches_park_services_only(client: httpx.AsyncClient) -> None:
    reach = await get_json(client, f"/v1/regions/{GUANGDONG}/services", params={"card_region": HAINAN})
    assert reach["purposes"] == ["park"]
    assert reach["services"]
    assert all(item["usable_purposes"] == ["park"] for item in reach["services"])
    assert {"LIVE-TOUR-001", "LIVE-TOUR-002"} <= codes(reach)
    assert_consistent(reach)
    # Guangdong's own cards reach far more there.
    home = await get_json(client, f"/v1/regions/{GUANGDONG}/services")
    assert codes(reach) < codes(home)


@pytest.mark.usefixtures("catalog")
async def test_without_an_agreement_a_card_reaches_nothing_there(client: httpx.AsyncClient) -> None:
    reach = await get_json(client, f"/v1/regions/{GUANGDONG}/services", params={"card_region": CHONGQING})
    assert reach["purposes"] == [] and reach["services"] == []


@pytest.mark.usefixtures("catalog")
async def test_bad_region_codes_and_purposes_are_problems(client: httpx.AsyncClient) -> None:
    assert problem(await client.get("/v1/regions/51000/services"), 400)["code"] == "bad_request"
    assert problem(await client.get("/v1/regions/5100000/services"), 400)["code"] == "bad_request"
    assert problem(await client.get("/v1/regions/990000/services"), 404)["code"] == "not_found"
    problem(await client.get(f"/v1/regions/{SICHUAN}/services", params={"card_region": "x"}), 400)
    problem(await client.get(f"/v1/regions/{SICHUAN}/services", params={"card_region": "990000"}), 404)
    problem(await client.get(f"/v1/regions/{SICHUAN}/services", params={"purpose": "flying"}), 400)


@pytest.mark.usefixtures("catalog")
async def test_a_holder_sees_what_the_card_may_do_at_home_and_elsewhere(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, CHONGQING)
    auth = holder.auth
    home = await get_json(client, "/v1/holder/services", auth=auth)
    assert home["region"] == home["card_region"] == CHONGQING
    assert home["purposes"] == ALL_PURPOSES
    assert codes(home) == codes(await get_json(client, f"/v1/regions/{CHONGQING}/services"))

    sichuan = await get_json(client, "/v1/holder/services", params={"region": SICHUAN}, auth=auth)
    assert (sichuan["region"], sichuan["card_region"]) == (SICHUAN, CHONGQING)
    assert sichuan["purposes"] == ["general", "library", "medical"]
    assert "LIVE-CUL-002" in codes(sichuan) and "LIVE-TRN-001" not in codes(sichuan)
    assert_consistent(sichuan)
    library = await get_json(client, "/v1/holder/services", params={"region": SICHUAN, "purpose": "library"}, auth=auth)
    assert library["services"] and usable(library) == {"library"}

    problem(await client.get("/v1/holder/services"), 401)
    problem(await client.get("/v1/holder/services", headers=bearer("not-a-token")), 401)
    problem(await client.get("/v1/holder/services", params={"region": "51"}, auth=auth), 400)
    problem(await client.get("/v1/holder/services", params={"region": "990000"}, auth=auth), 404)


@pytest.mark.usefixtures("catalog")
async def test_a_terminal_sees_what_its_kind_offers_a_card_through_the_purposes_it_accepts(
    client: httpx.AsyncClient, admin_token: str, gate: factories.Gate
) -> None:
    library = await factories.new_gate(client, admin_token, SICHUAN, "library", ["library"])
    reach = await get_json(client, "/v1/terminal/services", headers=library.headers)
    assert (reach["region"], reach["card_region"], reach["business_type"]) == (SICHUAN, SICHUAN, "library")
    assert reach["purposes"] == ["library"]
    assert {"LIVE-CUL-001", "LIVE-CUL-002"} <= codes(reach)
    assert all("library" in item["business_types"] for item in reach["services"])
    assert_consistent(reach)
    from_chongqing = await get_json(
        client, "/v1/terminal/services", params={"card_region": CHONGQING}, headers=library.headers
    )
    assert codes(from_chongqing) == codes(reach), "the library network spans both regions"

    # The session's transit gate in Sichuan (transit and general): fares for Sichuan cards, none for Chongqing's.
    own = await get_json(client, "/v1/terminal/services", headers=gate.headers)
    assert own["business_type"] == "transit"
    assert "LIVE-TRN-001" in codes(own) and "transit" in usable(own)
    visiting = await get_json(client, "/v1/terminal/services", params={"card_region": CHONGQING}, headers=gate.headers)
    assert visiting["purposes"] == ["general"]
    assert "transit" not in usable(visiting) and "LIVE-TRN-001" not in codes(visiting)

    office = await factories.new_gate(client, admin_token, SICHUAN, "hrss_office", ["general"])
    hrss = await get_json(client, "/v1/terminal/services", params={"card_region": CHONGQING}, headers=office.headers)
    assert "HRSS-SI-001" in codes(hrss)
    assert all(item["business_types"].count("hrss_office") == 1 for item in hrss["services"])

    park = await factories.new_gate(client, admin_token, GUANGDONG, "park", ["park"])
    annual = await get_json(client, "/v1/terminal/services", params={"card_region": HAINAN}, headers=park.headers)
    assert annual["purposes"] == ["park"] and "LIVE-TOUR-002" in codes(annual)

    problem(await client.get("/v1/terminal/services"), 401)
    problem(await client.get("/v1/terminal/services", headers={"X-Api-Key": "ecv1.nope.nope"}), 401)
    problem(await client.get("/v1/terminal/services", params={"card_region": "990000"}, headers=gate.headers), 404)


# --- the command, on a fresh database per backend --------------------------------------------


@dataclass
class Fresh:
    """A fresh migrated database: the command's environment, a context and an app client on it."""

    env: dict[str, str]
    context: ServiceContext
    client: httpx.AsyncClient


@pytest.fixture(params=BACKENDS)
async def fresh(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: URL, redis_url: str, redis_prefix: str
) -> AsyncIterator[Fresh]:
    """A fresh migrated database with the test regions registered through the operator API."""
    url = await migrated_database(request.param, tmp_path, postgres_url)
    database_url = url.render_as_string(hide_password=False)
    prefix = f"{redis_prefix}catalog-{request.param}:"
    app = create_app(make_settings(database_url, redis_url, prefix))
    async with serve(app) as client:
        context: ServiceContext = app.state["ecard"]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await register_regions(client, token, {**factories.REGIONS, **EXTRA_REGIONS})
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "ECARD_REDIS_PREFIX": prefix}
        yield Fresh(env, context, client)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


@dataclass
class Run:
    """A finished command: exit code, and its output with the terminal's line wrapping and boxes undone."""

    returncode: int
    stdout: str
    stderr: str


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


async def catalog_load(env: dict[str, str], *args: str) -> Run:
    """Run `litestar ecard catalog load …` to the end, in a thread.

    The served app's loop keeps running meanwhile, as a worker's does beside an operator's command: a
    write of its background tasks caught in flight by a blocked loop held SQLite's write lock until the
    command gave up ("database is locked" after the busy timeout).
    """
    done = await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "litestar"), "--app", "app.asgi:create_app", "ecard", "catalog", "load", *args],
        cwd=PROJECT_ROOT, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return Run(done.returncode, _flat(done.stdout), _flat(done.stderr))


def write_catalog(path: Path, change: Any) -> Path:
    """The shipped catalogue with change(document) applied, written to path."""
    document = json.loads(json.dumps(SHIPPED))
    change(document)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


async def snapshot(context: ServiceContext) -> dict[str, Any]:
    """Everything a load writes."""
    async with context.sessions() as session:
        services = {
            row.code: (row.name_en, row.version, row.updated_at, row.withdrawn_at)
            for row in await session.scalars(select(CatalogService))
        }
        rows = await session.execute(select(RegionService.region_code, RegionService.service_code))
        regions = {(region, code) for region, code in rows}
        versions = [(row.id, row.version, row.sha256) for row in await session.scalars(select(CatalogVersion))]
        audits = await session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "catalog.loaded")
        )
    return {"services": services, "regions": regions, "versions": versions, "audits": audits}


async def test_the_command_loads_once_and_says_so_when_run_again(fresh: Fresh) -> None:
    client = fresh.client
    # Before any load: empty answers, not errors.
    assert await get_json(client, "/v1/catalog/services") == []
    empty = await get_json(client, f"/v1/regions/{SICHUAN}/services")
    assert empty["services"] == [] and empty["catalog_version"] is None
    assert (await get_json(client, "/v1/catalog"))["loaded"] is False
    problem(await client.get("/v1/catalog/services/HRSS-SI-001"), 404)

    first = await catalog_load(fresh.env)
    assert first.returncode == 0, first.stderr
    total = len(SHIPPED["services"])
    assert f"{total} services (95 HR & social security, {total - 95} livelihood" in first.stdout
    assert f"{total} added, 0 updated, 0 withdrawn" in first.stdout
    loaded = await snapshot(fresh.context)
    assert len(loaded["services"]) == total and len(loaded["versions"]) == 1 and loaded["audits"] == 1
    async with fresh.context.sessions() as session:
        event = await session.scalar(select(AuditEvent).where(AuditEvent.action == "catalog.loaded"))
    assert event is not None
    assert (event.actor_type, event.actor_id) == ("command", "ecard catalog load")
    assert event.after is not None and event.after["hrss"] == 95

    again = await catalog_load(fresh.env, "--file", str(DEFAULT_SERVICES_FILE), "--regions", str(DEFAULT_REGIONS_FILE))
    assert again.returncode == 0, again.stderr
    assert "already loaded: nothing changed" in again.stdout
    assert await snapshot(fresh.context) == loaded

    assert len(await get_json(client, "/v1/catalog/services", params={"domain": "hrss"})) == 95
    reach = await get_json(client, f"/v1/regions/{SICHUAN}/services", params={"card_region": CHONGQING})
    assert reach["catalog_version"] == SHIPPED["version"] and "LIVE-CUL-002" in codes(reach)


async def test_a_new_version_changes_adds_and_withdraws_and_an_old_one_comes_back(fresh: Fresh, tmp_path: Path) -> None:
    assert (await catalog_load(fresh.env)).returncode == 0
    before = await snapshot(fresh.context)
    withdrawn, added = "LIVE-TRN-004", "LIVE-TRN-006"
    assert {(SICHUAN, withdrawn), (GUANGDONG, withdrawn)} <= before["regions"]

    def next_version(document: dict[str, Any]) -> None:
        document["version"] = "2026-11-27.2"
        [changed] = [entry for entry in document["services"] if entry["code"] == "HRSS-EMP-003"]
        changed["name_en"] = "Recognition of employment difficulties"
        [gone] = [entry for entry in document["services"] if entry["code"] == withdrawn]
        document["services"].remove(gone)
        document["services"].append({**gone, "code": added, "name_zh": "城市轮渡乘船", "name_en": "Pay ferry fares"})

    result = await catalog_load(fresh.env, "--file", str(write_catalog(tmp_path / "next.json", next_version)))
    assert result.returncode == 0, result.stderr
    assert "catalogue 2026-11-27.2 loaded" in result.stdout
    assert "1 added, 1 updated, 1 withdrawn" in result.stdout
    assert "7 availabilities added, 7 removed" in result.stdout  # the seven regions that offer transport
    after = await snapshot(fresh.context)
    assert after["services"][withdrawn][3] is not None
    assert after["services"]["HRSS-EMP-003"][:2] == ("Recognition of employment difficulties", "2026-11-27.2")
    assert after["services"]["HRSS-EMP-001"] == before["services"]["HRSS-EMP-001"], (
        "unchanged entries stay as they were"
    )
    assert not any(code == withdrawn for _region, code in after["regions"])
    assert {(SICHUAN, added), (GUANGDONG, added)} <= after["regions"]
    assert len(after["versions"]) == 2 and after["audits"] == 2

    client = fresh.client
    problem(await client.get(f"/v1/catalog/services/{withdrawn}"), 404)
    sichuan = await get_json(client, f"/v1/regions/{SICHUAN}/services")
    assert sichuan["catalog_version"] == "2026-11-27.2"
    assert added in codes(sichuan) and withdrawn not in codes(sichuan)
    assert len(await get_json(client, "/v1/catalog/services", params={"domain": "hrss"})) == 95

    # Loading the first version again brings it back: the withdrawn service returns to its regions.
    back = await catalog_load(fresh.env)
    assert back.returncode == 0, back.stderr
    assert "0 added, 2 updated, 1 withdrawn" in back.stdout
    restored = await snapshot(fresh.context)
    assert {code for code, row in restored["services"].items() if row[3] is None} == set(before["services"])
    assert restored["regions"] == before["regions"]
    assert len(restored["versions"]) == 3


async def test_the_command_refuses_a_changed_file_under_an_old_version_and_a_file_that_breaks_a_rule(
    fresh: Fresh, tmp_path: Path
) -> None:
    assert (await catalog_load(fresh.env)).returncode == 0
    before = await snapshot(fresh.context)

    def renamed(document: dict[str, Any]) -> None:
        document["services"][0]["name_en"] = "Something else"

    reused = await catalog_load(fresh.env, "--file", str(write_catalog(tmp_path / "reused.json", renamed)))
    assert reused.returncode == 1
    assert f"catalogue version {SHIPPED['version']} was loaded before with different content" in reused.stderr

    def electronic_pension(document: dict[str, Any]) -> None:
        document["version"] = "2026-11-27.3"
        [pension] = [entry for entry in document["services"] if entry["code"] == "HRSS-PEN-001"]
        pension["forms"] = ["physical", "electronic"]
        pension["purposes"] = ["general"]

    refused = await catalog_load(fresh.env, "--file", str(write_catalog(tmp_path / "pension.json", electronic_pension)))
    assert refused.returncode == 1
    assert "benefit payouts go to the physical card's bank account only" in refused.stderr
    assert "nothing was loaded" in refused.stderr

    missing = await catalog_load(fresh.env, "--file", str(tmp_path / "absent.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    assert await snapshot(fresh.context) == before
