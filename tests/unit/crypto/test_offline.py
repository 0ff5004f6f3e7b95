"""Offline verification: kits (JWKS + signed kit period), the decision, and the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest

from crypto.base45 import b45encode
from crypto.credential import PREFIX, Claims, Purpose, Rejection, encode_claims, issue_credential, seal_for
from crypto.jwk import jwks
from crypto.keys import SigningKey, VerifyKey, b64url
from crypto.offline import (
    OfflineClaims,
    OfflineKit,
    OfflineKitError,
    OfflineReason,
    OfflineResult,
    kit_document,
    main,
    verify_offline,
)
from crypto.status_list import StatusList, sign_status_list

ROOT = Path(__file__).resolve().parents[3]

SICHUAN = "510000"
CHONGQING = "500000"
GUANGDONG = "440000"
SICHUAN_KEY = SigningKey.from_seed(bytes(range(32)))
CHONGQING_KEY = SigningKey.from_seed(bytes(range(64, 96)))
STRANGER = SigningKey.from_seed(bytes(range(32, 64)))
PUBLISHED = [SICHUAN_KEY.verify_key(SICHUAN), CHONGQING_KEY.verify_key(CHONGQING)]

NOW = 1_750_000_000
LEEWAY = 5
LIST_IAT = NOW - 3_600
LIST_EXP = NOW + 3_600
CARD_REF = bytes.fromhex("5ec0ca7d00112233445566778899aabb")
NONCE = bytes.fromhex("00010203040506")

# A kit's token names no card (codes carry no index): the list the service signs is empty.
NO_ENTRIES: dict[int, int] = {}


def status_token(
    region: str = SICHUAN,
    key: SigningKey = SICHUAN_KEY,
    statuses: Any = NO_ENTRIES,
    expires_at: int = LIST_EXP,
    bits: int = 2,
) -> bytes:
    padding = {} if bits == 2 else {"padding": 0}
    return sign_status_list(
        key,
        region=region,
        subject=f"https://ecard.example/v1/status-lists/{region}",
        status_list=StatusList.from_statuses(statuses, bits=bits, **padding)
        if statuses
        else StatusList.from_statuses({}, size=0),
        issued_at=LIST_IAT,
        expires_at=expires_at,
        ttl=600,
    )


def kit_json(region: str = SICHUAN, keys: list[VerifyKey] = PUBLISHED, token: bytes | None = None, **extra: Any) -> str:
    document = kit_document(region, keys, status_token(region) if token is None else token)
    document.update(extra)
    return json.dumps(document)


def kit(region: str = SICHUAN, **kwargs: Any) -> OfflineKit:
    return OfflineKit.from_json(kit_json(region, **kwargs))


def credential(
    region: str = SICHUAN,
    key: SigningKey = SICHUAN_KEY,
    purpose: Purpose = Purpose.TRANSIT,
    window: tuple[int, int] = (NOW - 30, NOW + 30),
    card_ref: bytes = CARD_REF,
    nonce: bytes = NONCE,
) -> str:
    claims = Claims(card_ref, nonce, region, purpose, not_before=window[0], expires_at=window[1])
    return issue_credential(key, claims)


def sealed(card_ref: bytes = CARD_REF, nonce: bytes = NONCE, not_before: int = NOW - 30) -> bytes:
    """The reference as Sichuan's key seals it in a code (crypto/seal.py)."""
    return seal_for(SICHUAN_KEY, SICHUAN).seal(card_ref, nonce, not_before)


# --- kits --------------------------------------------------------------------------------------


def test_kit_from_json_holds_the_region_keys_and_verified_list() -> None:
    loaded = kit()
    assert loaded.region == SICHUAN
    assert loaded.keys == {key.kid: key for key in PUBLISHED}
    assert loaded.status_list.region == SICHUAN
    assert loaded.status_list.expires_at == LIST_EXP
    assert len(loaded.status_list.status_list) == 0


def test_kit_reads_bytes_and_ignores_unknown_members() -> None:
    loaded = OfflineKit.from_json(kit_json(version=2, note="for gate 17").encode())
    assert loaded.region == SICHUAN


def test_kit_document_is_region_jwks_and_base64url_token() -> None:
    token = status_token()
    assert kit_document(SICHUAN, PUBLISHED, token) == {
        "region": SICHUAN,
        "jwks": jwks(PUBLISHED),
        "status_list": b64url(token),
    }


def _kit_with(**changes: Any) -> str:
    document = json.loads(kit_json())
    for name, value in changes.items():
        if value is None:
            del document[name]
        else:
            document[name] = value
    return json.dumps(document)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        ("[]", "JSON object"),
        ("null", "JSON object"),
        (_kit_with(region=None), "region"),
        (_kit_with(region=510000), "region"),
        (_kit_with(region="51000"), "region"),
        (_kit_with(jwks=None), "jwks"),
        (_kit_with(jwks={"keys": "none"}), "jwks"),
        (_kit_with(jwks={"keys": [{**jwks(PUBLISHED)["keys"][0], "kid": "AAAAAAAAAAA"}]}), "jwks"),
        (_kit_with(status_list=None), "base64url"),
        (_kit_with(status_list=42), "base64url"),
        (_kit_with(status_list="not base64url!"), "base64url"),
        (_kit_with(status_list=b64url(b"\x00\x01")), "malformed"),
        (_kit_with(region=CHONGQING), "covers region 510000, not 500000"),
        (kit_json(keys=[PUBLISHED[1]]), "unknown_key"),
        (kit_json(token=status_token(key=STRANGER)), "unknown_key"),
        (kit_json(token=status_token(region=SICHUAN, key=CHONGQING_KEY)), "bad_signature"),
    ],
    ids=[
        "empty",
        "truncated-json",
        "not-utf8",
        "array",
        "null",
        "no-region",
        "region-number",
        "region-short",
        "no-jwks",
        "jwks-bad",
        "jwks-kid-mismatch",
        "no-status-list",
        "status-list-number",
        "status-list-not-b64",
        "status-list-not-cose",
        "list-of-another-region",
        "list-key-not-in-jwks",
        "list-by-unpublished-key",
        "list-by-another-regions-key",
    ],
)
def test_unusable_kits_raise_offline_kit_error(data: str | bytes, message: str) -> None:
    with pytest.raises(OfflineKitError, match=message):
        OfflineKit.from_json(data)


def test_a_tampered_status_list_in_a_kit_is_refused() -> None:
    document = json.loads(kit_json())
    token = bytearray(status_token())
    token[-1] ^= 0x01  # last signature byte
    document["status_list"] = b64url(bytes(token))
    with pytest.raises(OfflineKitError, match="bad_signature"):
        OfflineKit.from_json(json.dumps(document))


def test_offline_kit_error_is_a_value_error() -> None:
    assert issubclass(OfflineKitError, ValueError)


# --- the decision ------------------------------------------------------------------------------


def decide(text: str, kits: Any = None, now: int = NOW, allow_stale: bool = False) -> OfflineResult:
    return verify_offline(text, kit() if kits is None else kits, now, LEEWAY, allow_stale=allow_stale)


def test_a_valid_code_is_accepted_with_its_claims_and_the_reference_only_sealed() -> None:
    result = decide(credential(purpose=Purpose.LIBRARY))
    assert result.accepted is True
    assert result.reason is None
    assert result.stale is False
    assert result.list_expires_at == LIST_EXP
    assert result.claims == OfflineClaims(
        sealed_ref=sealed().hex(),
        nonce=NONCE.hex(),
        region=SICHUAN,
        purpose="library",
        not_before=NOW - 30,
        expires_at=NOW + 30,
    )
    assert sealed().hex() != CARD_REF.hex()


def test_two_codes_of_one_card_show_the_gate_nothing_in_common_but_region_purpose_and_times() -> None:
    first = decide(credential(nonce=NONCE)).claims
    second = decide(credential(nonce=bytes.fromhex("aabbccddeeff00"))).claims
    assert first is not None and second is not None
    assert first.sealed_ref != second.sealed_ref and first.nonce != second.nonce
    assert (first.region, first.purpose, first.not_before) == (second.region, second.purpose, second.not_before)


def test_a_kit_whose_token_still_carries_entries_decides_nothing_by_them() -> None:
    # An older build's list (statuses by index): codes carry no index, so no entry can refuse one.
    older = kit(token=status_token(statuses=[1, 2, 3, 1], bits=2))
    assert decide(credential(), kits=older).accepted is True


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("EC1:not a credential", OfflineReason.MALFORMED),
        (credential(key=STRANGER), OfflineReason.UNKNOWN_KEY),
        (credential(key=CHONGQING_KEY), OfflineReason.BAD_SIGNATURE),  # iss 510000, key of 500000
        (credential(window=(NOW - LEEWAY - 61, NOW - LEEWAY - 1)), OfflineReason.EXPIRED),
        (credential(window=(NOW + LEEWAY + 1, NOW + LEEWAY + 61)), OfflineReason.NOT_YET_VALID),
        (credential(window=(NOW - 30, NOW + 36)), OfflineReason.LIFETIME_EXCEEDED),
        (credential(window=(NOW - 30, NOW + 365 * 86_400)), OfflineReason.LIFETIME_EXCEEDED),
    ],
    ids=["malformed", "unknown-key", "bad-signature", "expired", "not-yet-valid", "lifetime-66s", "lifetime-a-year"],
)
def test_the_credentials_own_rejections_keep_their_codes(text: str, reason: OfflineReason) -> None:
    result = decide(text)
    assert result.accepted is False
    assert result.reason is reason
    assert result.claims is None
    assert result.list_expires_at is None


def test_the_lifetime_bound_is_the_services_default_unless_given() -> None:
    # 60 s + 5 s of skew by default, as the service; a gate of a deployment with longer codes says so.
    assert decide(credential(window=(NOW - 30, NOW + 35))).accepted is True
    assert decide(credential(window=(NOW - 30, NOW + 36))).reason is OfflineReason.LIFETIME_EXCEEDED
    longer = credential(window=(NOW - 30, NOW + 300))
    assert verify_offline(longer, kit(), NOW, LEEWAY, lifetime=325).accepted is True
    assert verify_offline(longer, kit(), NOW, LEEWAY, lifetime=324).reason is OfflineReason.LIFETIME_EXCEEDED


def test_a_credential_with_crit_in_its_header_is_malformed_offline() -> None:
    payload = encode_claims(
        Claims(CARD_REF, NONCE, SICHUAN, Purpose.TRANSIT, NOW - 30, NOW + 30), seal_for(SICHUAN_KEY, SICHUAN)
    )
    protected = cbor2.dumps({1: -8, 4: SICHUAN_KEY.kid, 2: [99], 99: 1})
    signature = SICHUAN_KEY.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    text = PREFIX + b45encode(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature])))
    result = decide(text)
    assert (result.accepted, result.reason) == (False, OfflineReason.MALFORMED)
    assert "crit" in result.detail


def test_reason_codes_extend_the_credentials_rejections() -> None:
    assert {reason.value for reason in Rejection} < {reason.value for reason in OfflineReason}


def test_an_expired_credential_is_expired_before_the_kit_is_consulted() -> None:
    result = decide(credential(window=(NOW - 100, NOW - 60)), now=LIST_EXP + 86_400)
    assert (result.reason, result.stale, result.list_expires_at) == (OfflineReason.EXPIRED, False, None)


def test_a_card_of_a_region_without_a_kit_is_region_not_accepted() -> None:
    # Chongqing's key is in the kit's JWKS, so the credential verifies, but there is no Chongqing list.
    result = decide(credential(region=CHONGQING, key=CHONGQING_KEY))
    assert result.accepted is False
    assert result.reason is OfflineReason.REGION_NOT_ACCEPTED
    assert result.claims is not None
    assert result.claims.region == CHONGQING


def test_each_code_is_decided_on_its_own_regions_kit() -> None:
    stale_chongqing = kit(CHONGQING, token=status_token(CHONGQING, CHONGQING_KEY, expires_at=NOW - 60))
    kits = [kit(SICHUAN), stale_chongqing]
    assert decide(credential(), kits=kits).accepted is True
    other = decide(credential(region=CHONGQING, key=CHONGQING_KEY), kits=kits)
    assert (other.reason, other.list_expires_at) == (OfflineReason.STATUS_STALE, NOW - 60)


def test_two_kits_for_one_region_are_refused() -> None:
    with pytest.raises(ValueError, match="two kits"):
        decide(credential(), kits=[kit(), kit()])


def test_kits_that_disagree_on_a_keys_region_are_refused() -> None:
    # The other kit publishes Sichuan's key as Guangdong's.
    keys = [SICHUAN_KEY.verify_key(GUANGDONG), CHONGQING_KEY.verify_key(CHONGQING)]
    other = kit(CHONGQING, keys=keys, token=status_token(CHONGQING, CHONGQING_KEY))
    with pytest.raises(ValueError, match="disagree"):
        decide(credential(), kits=[kit(), other])


# --- staleness ---------------------------------------------------------------------------------


def test_a_list_is_fresh_up_to_exp_plus_leeway() -> None:
    fresh_window = (LIST_EXP + LEEWAY - 30, LIST_EXP + LEEWAY + 30)
    result = decide(credential(window=fresh_window), now=LIST_EXP + LEEWAY)
    assert result.accepted is True
    assert result.stale is False


def test_a_stale_list_rejects_with_status_stale() -> None:
    now = LIST_EXP + LEEWAY + 1
    result = decide(credential(window=(now - 30, now + 30)), now=now)
    assert result.accepted is False
    assert result.reason is OfflineReason.STATUS_STALE
    assert result.stale is True
    assert result.list_expires_at == LIST_EXP
    assert result.claims is not None


def test_a_stale_list_may_decide_when_allowed_and_the_result_is_flagged() -> None:
    now = LIST_EXP + 86_400
    accepted = decide(credential(window=(now - 30, now + 30)), now=now, allow_stale=True)
    assert accepted.accepted is True
    assert accepted.stale is True
    assert accepted.detail == "accepted on a stale kit"


def test_to_json_has_every_field() -> None:
    now = LIST_EXP + 60
    document = decide(credential(window=(now - 30, now + 30)), now=now).to_json()
    assert document == {
        "result": "rejected",
        "reason": "status_stale",
        "detail": "the offline kit has expired",
        "stale": True,
        "status_list_expires_at": LIST_EXP,
        "claims": {
            "sealed_ref": sealed(not_before=now - 30).hex(),
            "nonce": NONCE.hex(),
            "region": SICHUAN,
            "purpose": "transit",
            "not_before": now - 30,
            "expires_at": now + 30,
        },
    }
    assert json.loads(json.dumps(document)) == document


# --- command line ------------------------------------------------------------------------------


@pytest.fixture
def kit_file(tmp_path: Path) -> Path:
    path = tmp_path / "kit.json"
    path.write_text(kit_json(), encoding="utf-8")
    return path


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crypto.offline", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_cli_accepts_a_valid_card_on_a_fresh_list(kit_file: Path) -> None:
    result = run_cli("--kit", str(kit_file), "--now", str(NOW), credential())
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["result"] == "accepted"
    assert output["reason"] is None
    assert output["stale"] is False
    assert output["status_list_expires_at"] == LIST_EXP
    assert output["claims"]["sealed_ref"] == sealed().hex()
    assert output["claims"]["purpose"] == "transit"
    assert "card_ref" not in output["claims"] and "status_index" not in output["claims"]


def test_cli_rejects_on_a_stale_list(kit_file: Path) -> None:
    now = LIST_EXP + 60
    result = run_cli("--kit", str(kit_file), "--now", str(now), credential(window=(now - 30, now + 30)))
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert (output["result"], output["reason"], output["stale"]) == ("rejected", "status_stale", True)


def test_cli_accepts_on_a_stale_list_with_allow_stale_and_flags_it(kit_file: Path) -> None:
    now = LIST_EXP + 60
    text = credential(window=(now - 30, now + 30))
    result = run_cli("--kit", str(kit_file), "--now", str(now), "--allow-stale", text)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert (output["result"], output["reason"], output["stale"]) == ("accepted", None, True)


def test_cli_reads_the_credential_from_stdin(kit_file: Path) -> None:
    result = run_cli("--kit", str(kit_file), "--now", str(NOW), "-", stdin=credential() + "\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == "accepted"


def test_cli_reports_a_malformed_credential_as_rejected(kit_file: Path) -> None:
    result = run_cli("--kit", str(kit_file), "--now", str(NOW), "hello")
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert (output["reason"], output["claims"]) == ("malformed", None)


def test_cli_exits_2_on_a_bad_kit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(_kit_with(status_list=b64url(b"\x00")), encoding="utf-8")
    result = run_cli("--kit", str(bad), "--now", str(NOW), credential())
    assert result.returncode == 2
    assert result.stdout == ""
    assert "cannot use kit" in result.stderr
    assert "bad.json" in result.stderr


def test_cli_exits_2_on_a_missing_kit_file(tmp_path: Path) -> None:
    result = run_cli("--kit", str(tmp_path / "absent.json"), credential())
    assert result.returncode == 2
    assert "cannot use kit" in result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["EC1:X"], ["--kit", "k.json"], ["--kit", "k.json", "--now", "soon", "EC1:X"]],
    ids=["nothing", "no-kit", "no-credential", "bad-now"],
)
def test_cli_exits_2_on_bad_usage(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


# In-process: the same entry point, faster, for the options' edges.


def test_main_strips_only_line_breaks_from_stdin(kit_file: Path) -> None:
    args = ["--kit", str(kit_file), "--now", str(NOW), "-"]
    out = io.StringIO()
    assert main(args, stdin=io.StringIO(credential() + "\r\n"), stdout=out) == 0
    assert json.loads(out.getvalue())["result"] == "accepted"
    # A trailing space is kept (Base45 has a space in its alphabet), which makes this text malformed.
    out = io.StringIO()
    assert main(args, stdin=io.StringIO(credential() + " \n"), stdout=out) == 1
    assert json.loads(out.getvalue())["reason"] == "malformed"


def test_cli_takes_the_lifetime_bound(kit_file: Path) -> None:
    text = credential(window=(NOW - 30, NOW + 300))
    refused = run_cli("--kit", str(kit_file), "--now", str(NOW), text)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "lifetime_exceeded"
    accepted = run_cli("--kit", str(kit_file), "--now", str(NOW), "--lifetime", "325", text)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["result"] == "accepted"


def test_main_exits_2_on_negative_now_leeway_or_lifetime(kit_file: Path) -> None:
    for option in (["--now", "-1"], ["--leeway", "-1"], ["--lifetime", "-1"]):
        with pytest.raises(SystemExit) as info:
            main(["--kit", str(kit_file), *option, credential()], stdout=io.StringIO())
        assert info.value.code == 2


def test_main_exits_2_when_two_kits_cover_one_region(kit_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main(["--kit", str(kit_file), "--kit", str(kit_file), "--now", str(NOW), credential()], stdout=out) == 2
    assert out.getvalue() == ""
    assert "two kits" in capsys.readouterr().err
