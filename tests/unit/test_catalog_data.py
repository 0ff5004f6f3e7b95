"""The catalogue files in app/data/catalog/ keep what public reporting confirms, and the reader enforces it.

Totals and rules from ../shared/data/README.md: 95 HR & social security services; their four uses;
the seven application types; benefit payouts to the physical card's bank account only; entries
named in a source are confirmed with that source, the rest illustrative.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from typing import Any, get_args

import msgspec
import pytest

from app.domain.catalog.document import (
    ALL_REGIONS,
    BusinessTypeName,
    Catalog,
    CatalogFileError,
    PurposeName,
    parse_catalog,
    parse_regions,
    read_catalog,
    read_regions,
)
from app.domain.catalog.services import DEFAULT_REGIONS_FILE, DEFAULT_SERVICES_FILE, covering_regions
from app.domain.verification.disclosure import BusinessType
from crypto.credential import Purpose

RAW: dict[str, Any] = json.loads(DEFAULT_SERVICES_FILE.read_text(encoding="utf-8"))
RAW_REGIONS: dict[str, Any] = json.loads(DEFAULT_REGIONS_FILE.read_text(encoding="utf-8"))
SERVICES: list[dict[str, Any]] = RAW["services"]
HRSS = [entry for entry in SERVICES if entry["domain"] == "hrss"]
LIVELIHOOD = [entry for entry in SERVICES if entry["domain"] == "livelihood"]
APPLICATION_TYPES = {
    "identity_credential": "身份凭证",
    "contribution_payment": "缴费",
    "benefit_payout": "待遇领取",
    "medical_settlement": "就医结算",
    "information_record": "信息记录",
    "self_service_query": "自助查询",
    "financial_payment": "金融支付",
}
# The sources ../shared/data/README.md lists, by address and date.
README_SOURCES = {
    "english.scio.gov.cn/m/pressroom/2023-03/09/content_85156907_4.htm": "2023-03-09",
    "m.igdzc.com/guonei/20220302/0228682.html": "2022-03",
    "lygmedia.com/shenghuo/20241024/24292233.html": "2024-10",
    "shqcsy.cn/jinrong/20230831/134644.html": "2023-08",
    "kcuv.cn/shebaoka/794298": "2017",
    "jxxf.gov.cn": "2024-01",
    "m.yd166.com/shehui/5618015926_3.html": None,
}


def by_name(name_zh: str) -> dict[str, Any]:
    """The one entry with this Chinese name."""
    [entry] = [entry for entry in SERVICES if entry["name_zh"] == name_zh]
    return entry


def encode(document: dict[str, Any]) -> bytes:
    """A document as a file's bytes."""
    return json.dumps(document, ensure_ascii=False).encode()


def broken(change: Any) -> bytes:
    """The shipped catalogue with change(document) applied."""
    document = copy.deepcopy(RAW)
    change(document)
    return encode(document)


def service(document: dict[str, Any], code: str) -> dict[str, Any]:
    """An entry of a document by code."""
    [entry] = [entry for entry in document["services"] if entry["code"] == code]
    return entry


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The shipped catalogue, read and checked."""
    return read_catalog(DEFAULT_SERVICES_FILE)


def test_the_shipped_files_pass_every_check(catalog: Catalog) -> None:
    availability = read_regions(DEFAULT_REGIONS_FILE, catalog)
    assert catalog.version == RAW["version"]
    assert len(catalog.sha256) == 64
    assert availability.version == RAW_REGIONS["version"]
    assert availability.services_by_region


def test_exactly_95_hr_and_social_security_services() -> None:
    assert len(HRSS) == 95
    assert LIVELIHOOD, "the livelihood services of the all-in-one card are there too"


def test_codes_are_unique_stable_and_say_domain_and_category() -> None:
    codes = [entry["code"] for entry in SERVICES]
    assert len(codes) == len(set(codes))
    prefixes = {category["code"]: category["prefix"] for category in RAW["categories"]}
    for entry in SERVICES:
        domain = {"hrss": "HRSS", "livelihood": "LIVE"}[entry["domain"]]
        assert re.fullmatch(rf"{domain}-{prefixes[entry['category']]}-\d{{3}}", entry["code"]), entry["code"]
        assert entry["name_zh"] and entry["name_en"]


def test_sources_are_the_ones_public_reporting_gives() -> None:
    assert {source["url"]: source["date"] for source in RAW["sources"]} == README_SOURCES


def test_confirmed_entries_carry_a_listed_source_and_the_rest_say_why_they_are_illustrative() -> None:
    sources = {source["id"] for source in RAW["sources"]}
    statuses = Counter(entry["provenance"]["status"] for entry in SERVICES)
    assert set(statuses) == {"confirmed", "illustrative"}
    for entry in SERVICES:
        provenance = entry["provenance"]
        if provenance["status"] == "confirmed":
            assert provenance["source"] in sources, entry["code"]
        else:
            assert provenance["source"] is None, entry["code"]
            assert "not available offline" in provenance["note"], entry["code"]


@pytest.mark.parametrize(
    ("name_zh", "source"),
    [
        ("办理参保", "xinhua-2022-03"),
        ("登记享受就业服务", "xinhua-2022-03"),
        ("参加职业培训", "xinhua-2022-03"),
        ("办理社保关系转移", "xinhua-2022-03"),
        ("社保待遇资格认证", "xinhua-2022-03"),
        ("查询社保权益", "xinhua-2022-03"),
        ("就业登记", "scio-2023-03-09"),  # "employment registration"
        ("社会保险费缴纳", "scio-2023-03-09"),  # "social insurance payments"
        ("养老金领取", "scio-2023-03-09"),  # "pension withdrawals"
        ("工伤医疗费用持卡结算", "xinhua-2024-10"),  # 工伤结算持卡
    ],
)
def test_the_services_named_in_the_sources_are_confirmed_hr_and_social_security_entries(
    name_zh: str, source: str
) -> None:
    entry = by_name(name_zh)
    assert entry["domain"] == "hrss"
    assert entry["provenance"] == {"status": "confirmed", "source": source, "note": entry["provenance"]["note"]}


def test_the_four_uses_of_the_95_are_all_present() -> None:
    groups = {group["name_zh"]: group["application_type"] for group in RAW["usage_groups"]}
    assert groups == {
        "身份凭证用卡": "identity_credential",
        "社保缴费凭卡": "contribution_payment",
        "工伤结算持卡": "medical_settlement",
        "补贴待遇进卡": "benefit_payout",
    }
    hrss_types = Counter(entry["application_type"] for entry in HRSS)
    for application_type in groups.values():
        assert hrss_types[application_type] > 0, application_type
    work_injury = [entry for entry in HRSS if entry["application_type"] == "medical_settlement"]
    assert all(entry["category"] == "work_injury_insurance" for entry in work_injury)


def test_application_types_are_the_seven_confirmed_ones() -> None:
    assert {item["code"]: item["name_zh"] for item in RAW["application_types"]} == APPLICATION_TYPES
    assert {entry["application_type"] for entry in SERVICES} == set(APPLICATION_TYPES)


def test_benefit_payouts_go_to_the_physical_card_only() -> None:
    payouts = [entry for entry in SERVICES if entry["application_type"] == "benefit_payout"]
    assert payouts
    for entry in payouts:
        assert entry["forms"] == ["physical"], entry["code"]
        assert entry["purposes"] == [], f"{entry['code']}: no credential reaches a physical-card payout"


def test_credential_purposes_go_with_the_electronic_card() -> None:
    for entry in SERVICES:
        assert entry["forms"] and set(entry["forms"]) <= {"physical", "electronic"}
        assert bool(entry["purposes"]) == ("electronic" in entry["forms"]), entry["code"]
        assert entry["business_types"], entry["code"]


def test_most_hr_and_social_security_identity_uses_go_through_general_credentials() -> None:
    identity = [entry for entry in HRSS if entry["application_type"] == "identity_credential"]
    general = [entry for entry in identity if entry["purposes"] == ["general"]]
    assert len(general) > len(identity) * 0.9
    medical = {entry["code"] for entry in HRSS if "medical" in entry["purposes"]}
    assert medical == {entry["code"] for entry in HRSS if entry["application_type"] == "medical_settlement"}


def test_livelihood_categories_are_those_of_the_all_in_one_card() -> None:
    categories = {category["code"] for category in RAW["categories"] if category["domain"] == "livelihood"}
    assert categories == {"government_services", "medical_care", "transport", "sightseeing", "culture", "subsidies"}
    assert {entry["category"] for entry in LIVELIHOOD} == categories
    purposes = {purpose for entry in LIVELIHOOD for purpose in entry["purposes"]}
    assert purposes == {"transit", "medical", "park", "library", "general"}


def test_purpose_and_business_type_names_are_the_services_own() -> None:
    assert set(get_args(PurposeName)) == {purpose.label for purpose in Purpose}
    assert set(get_args(BusinessTypeName)) == {kind.value for kind in BusinessType}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: service(d, "HRSS-PEN-001")["forms"].append("electronic"), "physical card's bank account only"),
        (lambda d: d["services"].remove(service(d, "HRSS-LAB-007")), "95 HR & social security services"),
        (lambda d: service(d, "HRSS-SI-001")["provenance"].update(source=None), "names its source"),
        (lambda d: service(d, "HRSS-SI-001")["provenance"].update(source="blog"), "unknown source"),
        (lambda d: service(d, "LIVE-TRN-001")["purposes"].clear(), "needs the credential purposes"),
        (lambda d: service(d, "LIVE-TRN-001").update(code="LIVE-MED-099"), "codes of category 'transport'"),
        (lambda d: service(d, "LIVE-TRN-001").update(code="LIVE-TRN-002"), "repeated service codes"),
        (lambda d: service(d, "LIVE-TRN-001").update(domain="hrss"), "belongs to domain 'livelihood'"),
        (lambda d: d["usage_groups"].pop(), "usage groups must be exactly"),
        (
            lambda d: [
                e.update(application_type="identity_credential")
                for e in d["services"]
                if e["domain"] == "hrss" and e["application_type"] == "contribution_payment"
            ],
            "usage group 'contribution_payment' has no HR & social security service",
        ),
        (lambda d: service(d, "LIVE-TRN-001").update(purposes=["flying"]), "malformed"),
        (lambda d: service(d, "LIVE-TRN-001").update(colour="red"), "malformed"),
    ],
)
def test_a_file_that_breaks_a_rule_is_refused_with_the_reason(change: Any, message: str) -> None:
    with pytest.raises(CatalogFileError, match=re.escape(message)):
        parse_catalog(broken(change))


def test_region_availability_expands_its_shorthands(catalog: Catalog) -> None:
    availability = read_regions(DEFAULT_REGIONS_FILE, catalog)
    regions = availability.services_by_region
    hrss = {entry.code for entry in catalog.services if entry.domain == "hrss"}
    assert hrss <= regions[ALL_REGIONS], "the 95 are on every card"
    assert "LIVE-TRN-001" in regions["510000"]
    assert {region for region, codes in regions.items() if "LIVE-CUL-002" in codes} == {"510000", "500000"}
    assert {region for region, codes in regions.items() if "LIVE-TOUR-002" in codes} == {"440000", "460000"}
    known = {entry.code for entry in catalog.services}
    assert all(codes <= known for codes in regions.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["regions"][1]["include"].append("category:teleportation"), "names no service"),
        (lambda d: d["regions"][1]["exclude"].append("LIVE-XXX-001"), "names no service"),
        (lambda d: d["regions"].append(copy.deepcopy(d["regions"][1])), "regions listed twice"),
        (lambda d: d["regions"][1].update(region="51000"), "malformed"),
    ],
)
def test_a_regions_file_that_breaks_a_rule_is_refused(catalog: Catalog, change: Any, message: str) -> None:
    document = copy.deepcopy(RAW_REGIONS)
    change(document)
    with pytest.raises(CatalogFileError, match=re.escape(message)):
        parse_regions(encode(document), catalog)


def test_a_region_is_covered_by_its_own_prefecture_province_and_nationwide_entries() -> None:
    assert covering_regions("510104") == ("510104", "510100", "510000", "*")
    assert covering_regions("510000") == ("510000", "*")


def test_the_sha256_is_of_the_file_bytes() -> None:
    raw = DEFAULT_SERVICES_FILE.read_bytes()
    reformatted = msgspec.json.encode(msgspec.json.decode(raw))
    assert parse_catalog(raw).sha256 != parse_catalog(reformatted).sha256
