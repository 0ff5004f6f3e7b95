"""The exact COSE header: every variant of it is refused, though correctly signed by a published key.

Each message here is signed over its own (altered) protected header with the issuer's real key,
so the signature holds and the header rule alone refuses it; the control case shows that the
same construction with the exact header verifies. RFC 9052 §3.1 is why `crit` must not pass:
a recipient that does not understand a critical header must reject the message.
"""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.base45 import b45encode
from crypto.cose import protected_header
from crypto.credential import (
    PREFIX,
    Claims,
    CredentialRejected,
    Purpose,
    Rejection,
    encode_claims,
    issue_credential,
    seal_for,
    unseal,
    verify_credential,
)
from crypto.keys import SigningKey, VerifyKey
from crypto.offline import OfflineKit, OfflineReason, kit_document, verify_offline
from crypto.status_list import TYP, StatusList, StatusListRejected, open_status_list, sign_status_list

REGION = "510000"
KEY = SigningKey.from_seed(bytes(range(32)))
KID = KEY.kid
OTHER_KID = SigningKey.from_seed(bytes(range(64, 96))).kid
KEYS: dict[bytes, VerifyKey] = {KEY.kid: KEY.verify_key(REGION)}
NOW = 1_750_000_000
LEEWAY = 5
CLAIMS = Claims(
    card_ref=bytes.fromhex("5ec0ca7d00112233445566778899aabb"),
    nonce=bytes.fromhex("00010203040506"),
    region=REGION,
    purpose=Purpose.TRANSIT,
    not_before=NOW - 30,
    expires_at=NOW + 30,
)
PAYLOAD = encode_claims(CLAIMS, seal_for(KEY, REGION))
EXACT = cbor2.dumps({1: -8, 4: KID})


def signed_message(protected: bytes, unprotected: Any = None, payload: bytes = PAYLOAD) -> bytes:
    """A tagged COSE_Sign1 correctly signed by KEY over this protected header (RFC 9052 Sig_structure)."""
    signature = KEY.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    assert KEYS[KID].verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {} if unprotected is None else unprotected, payload, signature]))


def signed_text(protected: bytes, unprotected: Any = None) -> str:
    return PREFIX + b45encode(signed_message(protected, unprotected))


def refused(text: str) -> CredentialRejected:
    with pytest.raises(CredentialRejected) as info:
        verify_credential(text, KEYS, NOW, LEEWAY)
    return info.value


def test_the_exact_header_signed_the_same_way_verifies_and_is_what_we_issue() -> None:
    # The control: only the header differs in every refused case below.
    assert protected_header(KID) == EXACT == bytes.fromhex("a2012704") + b"\x48" + KID
    text = signed_text(EXACT)
    assert text == issue_credential(KEY, CLAIMS)
    verified = verify_credential(text, KEYS, NOW, LEEWAY)
    assert unseal(verified, {KID: seal_for(KEY, REGION)}).claims == CLAIMS


def test_protected_header_builds_every_variant_as_cbor2_encodes_it() -> None:
    for kid in (KID, OTHER_KID):
        assert protected_header(kid) == cbor2.dumps({1: -8, 4: kid})
        assert protected_header(kid, TYP) == cbor2.dumps({1: -8, 4: kid, 16: TYP})


def _raw(*parts: bytes | str) -> bytes:
    return b"".join(bytes.fromhex(part) if isinstance(part, str) else part for part in parts)


PROTECTED_VARIANTS = [
    pytest.param(cbor2.dumps({1: -8, 4: KID, 2: [99], 99: "x"}), "2 (crit)", id="crit-naming-unknown-label-99"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 2: [99]}), "2 (crit)", id="crit-naming-an-absent-label"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 2: [4]}), "2 (crit)", id="crit-naming-known-kid"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 2: [1, 4]}), "2 (crit)", id="crit-naming-known-alg-and-kid"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 2: ["x"], "x": 1}), "2 (crit)", id="crit-naming-text-label"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 99: "x"}), "label 99,", id="unknown-label-99"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, -70000: 0}), "-70000", id="private-label"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, "note": "x"}), "'note'", id="text-label"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 16: "application/cwt"}), "16 (typ)", id="extra-typ"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 16: TYP}), "16 (typ)", id="status-list-typ"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 3: "application/cwt"}), "3 (content type)", id="content-type"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 5: bytes(12)}), "5 (iv)", id="iv"),
    pytest.param(cbor2.dumps({1: -8, 4: KID, 33: b"certificate"}), "33 (x5chain)", id="x5chain"),
    pytest.param(cbor2.dumps({1: "EdDSA", 4: KID}), "alg EdDSA", id="alg-as-text"),
    pytest.param(cbor2.dumps({1: -7, 4: KID}), "alg EdDSA", id="alg-es256"),
    pytest.param(_raw("a2", "f5 27", "04 48", KID), "label True", id="alg-label-true"),
    pytest.param(_raw("a2 01", "f9 c800", "04 48", KID), "canonical", id="alg-as-half-float-minus-8"),
    pytest.param(cbor2.dumps({1: [-8], 4: KID}), "alg EdDSA", id="alg-as-array"),
    pytest.param(cbor2.dumps({1: {-8: 1}, 4: KID}), "alg EdDSA", id="alg-as-map"),
    # SM2's private-use value in a longer encoding than canonical (8 bytes instead of 4).
    pytest.param(_raw("a2 01 3b 0000000000010001 04 48", KID), "canonical", id="sm2-alg-long-encoding"),
    pytest.param(cbor2.dumps({1: -65538, 4: KID, 2: [99]}), "label 2 (crit)", id="sm2-alg-with-crit"),
    pytest.param(_raw("a3 01 27 04 48", KID, "04 48", KID), "canonical", id="duplicate-kid"),
    pytest.param(_raw("a3 01 27 04 48", OTHER_KID, "04 48", KID), "canonical", id="duplicate-kid-two-values"),
    pytest.param(_raw("a3 01 27 01 27 04 48", KID), "canonical", id="duplicate-alg"),
    pytest.param(_raw("a2 01 27 04 58 08", KID), "canonical", id="kid-length-in-one-extra-byte"),
    pytest.param(_raw("a2 01 27 04 59 0008", KID), "canonical", id="kid-length-in-two-extra-bytes"),
    pytest.param(_raw("a2 01 38 07 04 48", KID), "canonical", id="alg-in-one-extra-byte"),
    pytest.param(_raw("b8 02 01 27 04 48", KID), "canonical", id="map-length-in-one-extra-byte"),
    pytest.param(_raw("bf 01 27 04 48", KID, "ff"), "canonical", id="indefinite-length-map"),
    pytest.param(_raw("a2 04 48", KID, "01 27"), "canonical", id="kid-before-alg"),
    pytest.param(_raw("a2 01 27 04 5f 44", KID[:4], "44", KID[4:], "ff"), "canonical", id="kid-in-chunks"),
    pytest.param(_raw("d9d9f7 a2 01 27 04 48", KID), "canonical", id="self-described-cbor-tag"),
]


@pytest.mark.parametrize(("protected", "detail"), PROTECTED_VARIANTS)
def test_a_signed_credential_whose_protected_header_is_not_exact_is_malformed(protected: bytes, detail: str) -> None:
    exc = refused(signed_text(protected))
    assert exc.reason is Rejection.MALFORMED
    assert detail in exc.detail


UNPROTECTED_VARIANTS = [
    pytest.param({4: KID}, "4", id="kid-in-unprotected-too"),
    pytest.param({4: OTHER_KID}, "4", id="another-kid-in-unprotected"),
    pytest.param({1: -8}, "1", id="alg-in-unprotected-too"),
    pytest.param({99: "note"}, "99", id="unknown-label"),
    pytest.param({2: [99], 99: 1}, "2 (crit)", id="crit"),
    pytest.param({5: bytes(12)}, "5 (iv)", id="iv"),
    pytest.param({33: b"certificate"}, "33 (x5chain)", id="x5chain"),
    pytest.param({"pad": b"x" * 40}, "'pad'", id="padding"),
]


@pytest.mark.parametrize(("unprotected", "label"), UNPROTECTED_VARIANTS)
def test_a_signed_credential_with_anything_in_its_unprotected_header_is_malformed(
    unprotected: dict[Any, Any], label: str
) -> None:
    exc = refused(signed_text(EXACT, unprotected))
    assert exc.reason is Rejection.MALFORMED
    assert "unprotected header must be empty" in exc.detail
    assert label in exc.detail


def test_kid_only_in_the_unprotected_header_is_malformed() -> None:
    exc = refused(signed_text(cbor2.dumps({1: -8}), {4: KID}))
    assert exc.reason is Rejection.MALFORMED
    assert "8-byte kid" in exc.detail


simple_values = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
)
extra_labels = st.integers(-(2**32), 2**32).filter(lambda label: label not in (1, 4)) | st.text(max_size=6)


@given(st.dictionaries(extra_labels, simple_values | st.lists(simple_values, max_size=3), min_size=1, max_size=3))
def test_any_signed_header_with_more_labels_than_alg_and_kid_is_malformed(extra: dict[Any, Any]) -> None:
    exc = refused(signed_text(cbor2.dumps({1: -8, 4: KID, **extra})))
    assert exc.reason is Rejection.MALFORMED
    assert "does not allow" in exc.detail


@given(st.dictionaries(st.integers(-70000, 70000) | st.text(max_size=6), simple_values, min_size=1, max_size=3))
def test_any_non_empty_unprotected_header_is_malformed(unprotected: dict[Any, Any]) -> None:
    exc = refused(signed_text(EXACT, unprotected))
    assert exc.reason is Rejection.MALFORMED
    assert "unprotected header must be empty" in exc.detail


def test_the_detail_names_at_most_five_labels_each_shortened() -> None:
    extra = {100 + i: 0 for i in range(8)} | {"x" * 60: 0}
    exc = refused(signed_text(cbor2.dumps({1: -8, 4: KID, **extra})))
    assert "104" in exc.detail
    assert "105" not in exc.detail
    assert len(exc.detail) < 200


# --- offline: the same rule through verify_offline ---------------------------------------------------


def _status_token(protected: bytes | None = None, unprotected: Any = None) -> bytes:
    token = sign_status_list(
        KEY,
        region=REGION,
        subject=f"https://ecard.example/v1/status-lists/{REGION}",
        status_list=StatusList.from_statuses([0, 0, 0, 0]),
        issued_at=NOW - 60,
        expires_at=NOW + 3600,
        ttl=300,
    )
    if protected is None and unprotected is None:
        return token
    payload = cbor2.loads(token).value[2]
    return signed_message(protected_header(KID, TYP) if protected is None else protected, unprotected, payload)


KIT = OfflineKit.from_json(json.dumps(kit_document(REGION, KEYS.values(), _status_token())))


@pytest.mark.parametrize(("protected", "detail"), PROTECTED_VARIANTS)
def test_offline_the_same_credentials_are_malformed(protected: bytes, detail: str) -> None:
    result = verify_offline(signed_text(protected), KIT, NOW, LEEWAY)
    assert (result.accepted, result.reason) == (False, OfflineReason.MALFORMED)
    assert detail in result.detail
    assert verify_offline(signed_text(EXACT), KIT, NOW, LEEWAY).accepted is True


@pytest.mark.parametrize(("unprotected", "label"), UNPROTECTED_VARIANTS)
def test_offline_a_non_empty_unprotected_header_is_malformed(unprotected: dict[Any, Any], label: str) -> None:
    result = verify_offline(signed_text(EXACT, unprotected), KIT, NOW, LEEWAY)
    assert (result.accepted, result.reason) == (False, OfflineReason.MALFORMED)
    assert "unprotected header must be empty" in result.detail


# --- the status list token: exactly {1: -8, 4: kid, 16: typ} ------------------------------------------


TYP_BYTES = cbor2.dumps(TYP)


def test_the_status_list_token_re_signed_with_its_exact_header_opens() -> None:
    assert b"\x78" + bytes([len(TYP)]) + TYP.encode() == TYP_BYTES  # so the two-byte length below is the long one
    assert _status_token(protected_header(KID, TYP)) == _status_token()
    assert open_status_list(_status_token(protected_header(KID, TYP)), KEYS).region == REGION


@pytest.mark.parametrize(
    ("protected", "unprotected", "detail"),
    [
        pytest.param(cbor2.dumps({1: -8, 4: KID, 16: TYP, 2: [99], 99: 1}), None, "2 (crit)", id="crit-unknown"),
        pytest.param(cbor2.dumps({1: -8, 4: KID, 16: TYP, 2: [16]}), None, "2 (crit)", id="crit-known-typ"),
        pytest.param(cbor2.dumps({1: -8, 4: KID, 16: TYP, 99: "x"}), None, "label 99", id="unknown-label-99"),
        pytest.param(cbor2.dumps({1: -8, 4: KID, 16: TYP, 3: 61}), None, "3 (content type)", id="content-type"),
        pytest.param(cbor2.dumps({1: -8, 4: KID}), None, "typ", id="no-typ"),
        pytest.param(cbor2.dumps({1: -8, 4: KID, 16: "application/cwt"}), None, "typ", id="other-typ"),
        pytest.param(cbor2.dumps({1: "EdDSA", 4: KID, 16: TYP}), None, "alg EdDSA", id="alg-as-text"),
        pytest.param(_raw("a3 10", TYP_BYTES, "01 27 04 48", KID), None, "canonical", id="typ-first"),
        pytest.param(_raw("a4 01 27 04 48", KID, "10", TYP_BYTES, "10", TYP_BYTES), None, "canonical", id="two-typs"),
        pytest.param(_raw("a3 01 27 04 58 08", KID, "10", TYP_BYTES), None, "canonical", id="kid-length-long"),
        pytest.param(
            _raw("a3 01 27 04 48", KID, "10 79", len(TYP).to_bytes(2, "big"), TYP.encode()),
            None,
            "canonical",
            id="typ-length-long",
        ),
        pytest.param(None, {4: KID}, "unprotected header must be empty", id="kid-in-unprotected"),
        pytest.param(None, {99: 0}, "unprotected header must be empty", id="unprotected-not-empty"),
    ],
)
def test_a_signed_status_list_token_whose_header_is_not_exact_is_malformed(
    protected: bytes | None, unprotected: dict[Any, Any] | None, detail: str
) -> None:
    with pytest.raises(StatusListRejected) as info:
        open_status_list(_status_token(protected, unprotected), KEYS)
    assert info.value.reason is Rejection.MALFORMED
    assert detail in info.value.detail
