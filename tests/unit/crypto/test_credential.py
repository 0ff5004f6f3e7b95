"""The eCard credential (CWT in COSE_Sign1, Base45 behind "EC1:"): round trip, size, every rejection.

Malformed inputs are built by hand with cbor2 and Base45 — and, where the branch under test lies
past the signature check, signed correctly — so that each test reaches exactly the branch it
names. The Sig_structure is rebuilt here from RFC 9052 rather than taken from the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import segno
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st

from app.settings import Settings
from crypto.base45 import b45decode, b45encode
from crypto.credential import (
    CARD_REF_LENGTH,
    DEFAULT_LEEWAY,
    DEFAULT_LIFETIME,
    MAX_TEXT_LENGTH,
    NONCE_LENGTH,
    PREFIX,
    Claims,
    CodeClaims,
    CredentialRejected,
    Purpose,
    Rejection,
    VerifiedCode,
    check_window,
    decode_claims,
    encode_claims,
    issue_credential,
    open_credential,
    parse_cose,
    seal_for,
    unseal,
    usable_until,
    verify_credential,
)
from crypto.keys import SigningKey, VerifyKey
from crypto.seal import SEALED_LENGTH

REGION = "510000"
OTHER_REGION = "500000"
KEY = SigningKey.from_seed(bytes(range(32)))
STRANGER = SigningKey.from_seed(bytes(range(32, 64)))  # not published
NOW = 1_700_000_000
LEEWAY = 5
KEYS: dict[bytes, VerifyKey] = {KEY.kid: KEY.verify_key(REGION)}
LIFETIME = DEFAULT_LIFETIME

CARD_REF = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE = bytes.fromhex("01020304050607")
# The reference as make_claims()'s credential carries it, sealed by KEY's seal for REGION.
SEALED_REF = seal_for(KEY, REGION).seal(CARD_REF, NONCE, NOW - 30)

# QR version 8 at level M holds 221 alphanumeric characters: 4 for the prefix, 217 of Base45,
# i.e. 144 bytes of COSE.
MAX_QR_TEXT = 221
MAX_COSE_BYTES = 144
MAX_QR_VERSION = 8

_DELETE = object()


def make_claims(**overrides: Any) -> Claims:
    fields: dict[str, Any] = {
        "card_ref": CARD_REF,
        "nonce": NONCE,
        "region": REGION,
        "purpose": Purpose.TRANSIT,
        "not_before": NOW - 30,
        "expires_at": NOW + 30,
    }
    fields.update(overrides)
    return Claims(**fields)


def claims_map(**overrides: Any) -> dict[int, Any]:
    """The raw CWT claims map of `make_claims()`; override by claim name, `_DELETE` to drop."""
    names = {"iss": 1, "exp": 4, "nbf": 5, "cti": 7, "card": -65537}
    claims: dict[int, Any] = {
        1: REGION,
        4: NOW + 30,
        5: NOW - 30,
        7: NONCE,
        -65537: [SEALED_REF, int(Purpose.TRANSIT)],
    }
    for name, value in overrides.items():
        if value is _DELETE:
            del claims[names[name]]
        else:
            claims[names[name]] = value
    return claims


def encode(claims: Claims, key: SigningKey = KEY) -> bytes:
    """The payload `issue_credential(key, claims)` signs: the reference sealed by key's seal."""
    return encode_claims(claims, seal_for(key, claims.region))


_SIGNERS = {key.kid: key for key in (KEY, STRANGER, SigningKey.from_seed(bytes(range(64, 96))))}


def resolved(result: VerifiedCode) -> Claims:
    """The issuer's view of a verified code: its reference opened with the signing key's seal."""
    return unseal(result, {result.key.kid: seal_for(_SIGNERS[result.key.kid], result.key.region)}).claims


def protected_header(alg: Any = -8, kid: Any = KEY.kid) -> bytes:
    header: dict[int, Any] = {}
    if alg is not _DELETE:
        header[1] = alg
    if kid is not _DELETE:
        header[4] = kid
    return cbor2.dumps(header)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 section 4.4 Sig_structure for COSE_Sign1, with empty external_aad."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(
    payload: Any = None,
    *,
    protected: Any = None,
    unprotected: Any = None,
    key: SigningKey = KEY,
    signature: Any = None,
    tag: int | None = 18,
) -> bytes:
    """A COSE_Sign1, correctly signed over whatever (bytes) protected header and payload it gets."""
    if payload is None:
        payload = encode(make_claims())
    if protected is None:
        protected = protected_header(kid=key.kid)
    if unprotected is None:
        unprotected = {}
    if signature is None and isinstance(protected, bytes) and isinstance(payload, bytes):
        signature = key.sign(sig_structure(protected, payload))
    items = [protected, unprotected, payload, signature]
    return cbor2.dumps(items if tag is None else cbor2.CBORTag(tag, items))


def as_text(raw: bytes) -> str:
    return PREFIX + b45encode(raw)


def cose_bytes(text: str) -> bytes:
    assert text.startswith(PREFIX)
    return b45decode(text[len(PREFIX) :])


def rejection(
    text: Any, keys: dict[bytes, VerifyKey] = KEYS, now: int = NOW, leeway: int = LEEWAY, lifetime: int = LIFETIME
) -> CredentialRejected:
    with pytest.raises(CredentialRejected) as info:
        verify_credential(text, keys, now, leeway, lifetime)
    return info.value


def valid_text() -> str:
    return issue_credential(KEY, make_claims())


claims_strategy = st.builds(
    lambda card_ref, nonce, region, purpose, window: Claims(
        card_ref=card_ref,
        nonce=nonce,
        region=region,
        purpose=purpose,
        not_before=window[0],
        expires_at=window[1],
    ),
    card_ref=st.binary(min_size=CARD_REF_LENGTH, max_size=CARD_REF_LENGTH),
    nonce=st.binary(min_size=NONCE_LENGTH, max_size=NONCE_LENGTH),
    region=st.text(alphabet="0123456789", min_size=6, max_size=6),
    purpose=st.sampled_from(Purpose),
    window=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(sorted),
)


# --- round trip ------------------------------------------------------------------------------


def test_issued_credential_verifies_and_returns_its_claims_and_key() -> None:
    claims = make_claims(purpose=Purpose.MEDICAL)
    result = verify_credential(issue_credential(KEY, claims), KEYS, NOW, LEEWAY)
    assert isinstance(result, VerifiedCode)
    assert isinstance(result.claims, CodeClaims)
    assert result.claims.sealed_ref != claims.card_ref
    assert resolved(result) == claims
    assert result.key == KEYS[KEY.kid]
    assert result.claims.purpose is Purpose.MEDICAL


def test_issued_credential_has_the_documented_layout() -> None:
    text = valid_text()
    assert text.startswith("EC1:")
    message = cbor2.loads(cose_bytes(text))
    assert isinstance(message, cbor2.CBORTag)
    assert message.tag == 18
    protected, unprotected, payload, signature = message.value
    assert cbor2.loads(protected) == {1: -8, 4: KEY.kid}
    assert unprotected == {}
    assert cbor2.loads(payload) == claims_map()
    assert len(signature) == 64
    assert KEY.verify_key(REGION).verify(signature, sig_structure(protected, payload))


def test_issuance_is_deterministic() -> None:
    assert valid_text() == valid_text()


def test_parse_cose_returns_the_signed_parts_and_kid() -> None:
    raw = cose_bytes(valid_text())
    protected, _, payload, signature = cbor2.loads(raw).value
    assert parse_cose(valid_text()) == (protected, payload, signature, KEY.kid)


def test_decode_claims_inverts_encode_claims_up_to_the_seal() -> None:
    claims = make_claims(purpose=Purpose.LIBRARY)
    sealed = seal_for(KEY, REGION).seal(CARD_REF, NONCE, claims.not_before)
    assert decode_claims(encode(claims)) == CodeClaims(
        sealed_ref=sealed, nonce=NONCE, region=REGION, purpose=Purpose.LIBRARY,
        not_before=claims.not_before, expires_at=claims.expires_at,
    )  # fmt: skip


def test_the_issuer_opens_what_it_sealed_and_nobody_reads_the_reference_in_clear() -> None:
    text = valid_text()
    assert CARD_REF not in cose_bytes(text)
    opened = open_credential(text, KEYS, {KEY.kid: seal_for(KEY, REGION)})
    assert opened.claims == make_claims()
    # Without the kid's seal the issuer cannot resolve it either (a key it no longer holds).
    with pytest.raises(CredentialRejected) as info:
        open_credential(text, KEYS, {})
    assert info.value.reason is Rejection.UNKNOWN_KEY
    # Another key's seal opens the block to some other 16 bytes, never to the card.
    assert open_credential(text, KEYS, {KEY.kid: seal_for(STRANGER, REGION)}).claims.card_ref != CARD_REF


@given(claims_strategy)
def test_any_claims_round_trip_through_issue_and_verify(claims: Claims) -> None:
    # Any window, given a lifetime that allows it (the lifetime rule has its own tests below).
    keys = {KEY.kid: KEY.verify_key(claims.region)}
    span = claims.expires_at - claims.not_before
    now = claims.not_before + span // 2
    result = verify_credential(issue_credential(KEY, claims), keys, now, 0, lifetime=span)
    assert resolved(result) == claims


def test_a_zero_length_window_and_the_extreme_times_are_accepted() -> None:
    for when in (0, 2**32 - 1):
        claims = make_claims(not_before=when, expires_at=when)
        assert resolved(verify_credential(issue_credential(KEY, claims), KEYS, when, 0)) == claims


@pytest.mark.parametrize("purpose", list(Purpose))
def test_purpose_labels_round_trip(purpose: Purpose) -> None:
    assert Purpose.from_label(purpose.label) is purpose
    assert purpose.label == purpose.name.lower()


def test_a_credential_verifies_among_several_published_keys() -> None:
    other = SigningKey.from_seed(bytes(range(64, 96)))
    keys = {**KEYS, other.kid: other.verify_key(OTHER_REGION)}
    text = issue_credential(other, make_claims(region=OTHER_REGION))
    assert verify_credential(text, keys, NOW, LEEWAY).key.region == OTHER_REGION
    assert verify_credential(valid_text(), keys, NOW, LEEWAY).key.region == REGION


# --- size: QR version 8 at level M -------------------------------------------------------------

LARGEST_CLAIMS = make_claims(
    card_ref=b"\xff" * CARD_REF_LENGTH,
    nonce=b"\xff" * NONCE_LENGTH,
    region="999999",
    purpose=Purpose.GENERAL,
    not_before=2**32 - 1,
    expires_at=2**32 - 1,
)


@given(claims_strategy)
def test_any_credential_fits_144_cose_bytes_and_221_characters(claims: Claims) -> None:
    text = issue_credential(KEY, claims)
    assert len(cose_bytes(text)) <= MAX_COSE_BYTES
    assert len(text) <= MAX_QR_TEXT


def test_the_largest_credential_is_exactly_139_bytes() -> None:
    # The sealed reference takes the clear one's 16 bytes; the status index (up to 5) is gone.
    assert NONCE_LENGTH == 7 and SEALED_LENGTH == CARD_REF_LENGTH == 16
    text = issue_credential(KEY, LARGEST_CLAIMS)
    assert len(cose_bytes(text)) == 139 <= MAX_COSE_BYTES
    assert len(text) == len(PREFIX) + 3 * (139 // 2) + 2 == 213


@pytest.mark.parametrize("claims", [make_claims(), LARGEST_CLAIMS], ids=["typical", "largest"])
def test_credential_fits_qr_version_8_level_m_in_alphanumeric_mode(claims: Claims) -> None:
    qr = segno.make(issue_credential(KEY, claims), error="m", micro=False)
    assert isinstance(qr.version, int)
    assert qr.version <= MAX_QR_VERSION
    assert qr.mode == "alphanumeric"
    assert qr.error == "M"


@settings(max_examples=20, deadline=None)
@given(claims_strategy)
def test_any_credential_fits_qr_version_8_level_m(claims: Claims) -> None:
    qr = segno.make(issue_credential(KEY, claims), error="m", micro=False)
    assert qr.version <= MAX_QR_VERSION
    assert qr.mode == "alphanumeric"


def test_rendered_qr_code_scans_back_with_zxing_and_verifies() -> None:
    text = issue_credential(KEY, LARGEST_CLAIMS)
    qr = segno.make(text, error="m", micro=False)
    rows = [bytes(0 if dark else 255 for dark in row) for row in qr.matrix_iter(scale=4, border=4)]
    image = memoryview(b"".join(rows)).cast("B", (len(rows), len(rows[0])))
    barcode = zxingcpp.read_barcode(image)
    assert barcode is not None
    assert barcode.text == text
    keys = {KEY.kid: KEY.verify_key("999999")}
    assert resolved(verify_credential(barcode.text, keys, 2**32 - 1, 0)) == LARGEST_CLAIMS


# --- malformed: structure, before any key is looked up ---------------------------------------


def _too_long_but_otherwise_valid(length: int) -> str:
    """A correctly signed credential padded to `length` characters with an extra (ignored) claim."""
    for pad in range(0, 400):
        claims = claims_map()
        if pad:
            claims[-65538] = b"x" * pad
        text = as_text(sign1(cbor2.dumps(claims)))
        if len(text) == length:
            return text
    raise AssertionError(f"no padding gives a {length}-character credential")


def test_text_of_the_maximum_length_is_accepted_and_one_more_step_is_malformed() -> None:
    # Base45 lengths are never 1 mod 3, so after 511 the next possible length is 513.
    longest = _too_long_but_otherwise_valid(MAX_TEXT_LENGTH - 1)
    assert resolved(verify_credential(longest, KEYS, NOW, LEEWAY)) == make_claims()
    too_long = _too_long_but_otherwise_valid(MAX_TEXT_LENGTH + 1)
    exc = rejection(too_long)
    assert exc.reason is Rejection.MALFORMED
    assert "too long" in exc.detail


@pytest.mark.parametrize("value", [None, b"EC1:", 42])
def test_non_string_input_is_malformed(value: Any) -> None:
    exc = rejection(value)
    assert exc.reason is Rejection.MALFORMED
    assert "missing" in exc.detail


@pytest.mark.parametrize(
    "make_text",
    [
        lambda: valid_text()[len(PREFIX) :],
        lambda: "ec1:" + valid_text()[len(PREFIX) :],
        lambda: "EC2:" + valid_text()[len(PREFIX) :],
        lambda: " " + valid_text(),
        lambda: "",
    ],
    ids=["missing", "lower-case", "other-version", "leading-space", "empty"],
)
def test_text_without_the_prefix_is_malformed(make_text: Callable[[], str]) -> None:
    exc = rejection(make_text())
    assert exc.reason is Rejection.MALFORMED
    assert "must start with" in exc.detail


@pytest.mark.parametrize(
    ("make_text", "detail"),
    [
        (lambda: PREFIX + valid_text()[len(PREFIX) :].lower(), "alphabet"),
        (lambda: valid_text() + "AA", "dangling"),  # 139 bytes end in a pair: 2 + 2 characters dangle
        (lambda: valid_text() + "é", "ASCII"),
        (lambda: PREFIX + "GGW", "above 65535"),
        (lambda: PREFIX + "GG", "above 255"),
    ],
    ids=["lower-case", "dangling", "non-ascii", "triplet-too-large", "pair-too-large"],
)
def test_bad_base45_is_malformed(make_text: Callable[[], str], detail: str) -> None:
    exc = rejection(make_text())
    assert exc.reason is Rejection.MALFORMED
    assert "not Base45-encoded CBOR" in exc.detail
    assert detail in exc.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x1c",  # reserved additional information
        sign1()[:-1],  # truncated signature
        b"\xd2\x84",  # tag 18, array of four, then nothing
        b"\x7f\x01\xff",  # indefinite text string holding an integer
    ],
    ids=["empty", "reserved-byte", "truncated", "header-only", "bad-indefinite-string"],
)
def test_bytes_that_are_not_cbor_are_malformed(raw: bytes) -> None:
    text = as_text(raw)
    assert cose_bytes(text) == raw  # the Base45 layer is fine; only CBOR decoding can fail
    exc = rejection(text)
    assert exc.reason is Rejection.MALFORMED
    assert "not Base45-encoded CBOR" in exc.detail


@pytest.mark.parametrize("trailer", [b"\x00", b"\xf6", sign1()])
def test_trailing_bytes_after_the_cose_message_are_malformed(trailer: bytes) -> None:
    exc = rejection(as_text(sign1() + trailer))
    assert exc.reason is Rejection.MALFORMED
    assert "trailing bytes" in exc.detail


def test_untagged_cose_sign1_is_malformed() -> None:
    exc = rejection(as_text(sign1(tag=None)))
    assert exc.reason is Rejection.MALFORMED
    assert "tagged COSE_Sign1" in exc.detail


@pytest.mark.parametrize("tag", [17, 98, 61, 55799])
def test_wrong_tag_is_malformed(tag: int) -> None:
    # 17 COSE_Mac0, 98 COSE_Sign, 61 CWT, 55799 self-described CBOR: this profile takes tag 18 only.
    exc = rejection(as_text(sign1(tag=tag)))
    assert exc.reason is Rejection.MALFORMED
    assert "tagged COSE_Sign1" in exc.detail


def test_cwt_tag_wrapping_a_cose_sign1_is_malformed() -> None:
    raw = cbor2.dumps(cbor2.CBORTag(61, cbor2.loads(sign1())))
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.MALFORMED
    assert "tagged COSE_Sign1" in exc.detail


@pytest.mark.parametrize(
    "value",
    [
        [],
        [b"", {}, b""],
        [protected_header(), {}, encode(make_claims()), b"\x00" * 64, b""],
        {"a": 1},
        b"\x00" * 64,
    ],
    ids=["empty", "three-items", "five-items", "map", "bytes"],
)
def test_tag_18_around_anything_but_a_four_item_array_is_malformed(value: Any) -> None:
    exc = rejection(as_text(cbor2.dumps(cbor2.CBORTag(18, value))))
    assert exc.reason is Rejection.MALFORMED
    assert "array of four" in exc.detail


@pytest.mark.parametrize(
    "raw",
    [
        sign1(protected={1: -8, 4: KEY.kid}, signature=b"\x00" * 64),
        sign1(unprotected=[]),
        cbor2.dumps(cbor2.CBORTag(18, [protected_header(), None, encode(make_claims()), b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [protected_header(), {}, None, b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [protected_header(), {}, "payload", b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [protected_header(), {}, encode(make_claims()), "sig"])),
    ],
    ids=[
        "protected-as-map",
        "unprotected-as-array",
        "unprotected-null",
        "detached-payload",
        "payload-text",
        "signature-text",
    ],
)
def test_cose_items_of_the_wrong_type_are_malformed(raw: bytes) -> None:
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.MALFORMED
    assert "wrong types" in exc.detail


@pytest.mark.parametrize(
    "protected",
    [b"", b"\x1c", protected_header() + b"\x00", b"\xa2\x01"],
    ids=["empty", "reserved-byte", "trailing-bytes", "truncated"],
)
def test_protected_header_that_is_not_cbor_is_malformed(protected: bytes) -> None:
    exc = rejection(as_text(sign1(protected=protected)))
    assert exc.reason is Rejection.MALFORMED
    assert "protected header is not CBOR" in exc.detail


@pytest.mark.parametrize(
    "protected",
    [
        cbor2.dumps([1, -8, 4, KEY.kid]),
        cbor2.dumps(-8),
        protected_header(alg=-7),  # ES256
        protected_header(alg=-35),  # ES384
        protected_header(alg="EdDSA"),
        protected_header(alg=_DELETE),
    ],
    ids=["array", "integer", "es256", "es384", "alg-as-text", "no-alg"],
)
def test_protected_header_without_alg_eddsa_is_malformed(protected: bytes) -> None:
    exc = rejection(as_text(sign1(protected=protected)))
    assert exc.reason is Rejection.MALFORMED
    assert "alg EdDSA" in exc.detail


def test_alg_only_in_the_unprotected_header_is_malformed() -> None:
    raw = sign1(protected=protected_header(alg=_DELETE), unprotected={1: -8})
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.MALFORMED
    assert "alg EdDSA" in exc.detail


@pytest.mark.parametrize(
    "kid",
    [_DELETE, KEY.kid[:7], KEY.kid + b"\x00", b"", KEY.kid.hex(), int.from_bytes(KEY.kid, "big")],
    ids=["missing", "seven-bytes", "nine-bytes", "empty", "text", "integer"],
)
def test_protected_header_without_an_8_byte_kid_is_malformed(kid: Any) -> None:
    exc = rejection(as_text(sign1(protected=protected_header(kid=kid))))
    assert exc.reason is Rejection.MALFORMED
    assert "8-byte kid" in exc.detail


def test_kid_only_in_the_unprotected_header_is_malformed() -> None:
    raw = sign1(protected=protected_header(kid=_DELETE), unprotected={4: KEY.kid})
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.MALFORMED
    assert "8-byte kid" in exc.detail


# --- malformed: claims, correctly signed by a published key ----------------------------------


def _signed_claims(claims: Any) -> str:
    payload = claims if isinstance(claims, bytes) else cbor2.dumps(claims)
    return as_text(sign1(payload))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x1c", encode(make_claims()) + b"\x00", encode(make_claims())[:-1]],
    ids=["empty", "reserved-byte", "trailing-bytes", "truncated"],
)
def test_payload_that_is_not_cbor_is_malformed(payload: bytes) -> None:
    exc = rejection(_signed_claims(payload))
    assert exc.reason is Rejection.MALFORMED
    assert "payload is not CBOR" in exc.detail


@pytest.mark.parametrize("claims", [[1, 2], "claims", 0, None], ids=["array", "text", "integer", "null"])
def test_payload_that_is_not_a_map_is_malformed(claims: Any) -> None:
    exc = rejection(_signed_claims(claims))
    assert exc.reason is Rejection.MALFORMED
    assert "not a claims map" in exc.detail


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"iss": _DELETE}, "iss"),
        ({"iss": 510000}, "iss"),
        ({"iss": b"510000"}, "iss"),
        ({"iss": "51000"}, "iss"),
        ({"iss": "5100000"}, "iss"),
        ({"iss": "51000A"}, "iss"),
        ({"iss": "-51000"}, "iss"),
        ({"exp": _DELETE}, "nbf and exp"),
        ({"nbf": _DELETE}, "nbf and exp"),
        ({"exp": float(NOW + 30)}, "nbf and exp"),
        ({"nbf": float(NOW - 30)}, "nbf and exp"),
        ({"exp": True}, "nbf and exp"),
        ({"nbf": False}, "nbf and exp"),
        ({"exp": str(NOW + 30)}, "nbf and exp"),
        ({"nbf": NOW + 31}, "nbf and exp"),
        ({"nbf": -1}, "nbf and exp"),
        ({"exp": 2**32, "nbf": 2**32}, "nbf and exp"),
        ({"exp": 2**64 - 1}, "nbf and exp"),
        ({"cti": _DELETE}, "cti"),
        ({"cti": NONCE[:-1]}, "cti"),
        ({"cti": NONCE + b"\x00"}, "cti"),
        ({"cti": NONCE.hex()}, "cti"),
        ({"card": _DELETE}, "card claim"),
        ({"card": SEALED_REF}, "card claim"),
        ({"card": [SEALED_REF]}, "card claim"),
        ({"card": [SEALED_REF, 1, 4321]}, "card claim"),  # the linkable format, with a status index
        ({"card": [SEALED_REF, 1, 4321, 0]}, "card claim"),
        ({"card": {SEALED_REF: 1}}, "card claim"),
        ({"card": [SEALED_REF[:-1], 1]}, "sealed card reference"),
        ({"card": [SEALED_REF + b"\x00", 1]}, "sealed card reference"),
        ({"card": [SEALED_REF.hex(), 1]}, "sealed card reference"),
    ],
    ids=lambda value: repr(value)[:40] if isinstance(value, dict) else None,
)
def test_claims_of_the_wrong_type_or_shape_are_malformed(overrides: dict[str, Any], detail: str) -> None:
    exc = rejection(_signed_claims(claims_map(**overrides)))
    assert exc.reason is Rejection.MALFORMED
    assert detail in exc.detail


@pytest.mark.parametrize("purpose", [0, 6, -1, 2**32, "transit", None, b"\x01", 1.5, [1]])
def test_unknown_purpose_is_malformed(purpose: Any) -> None:
    exc = rejection(_signed_claims(claims_map(card=[SEALED_REF, purpose])))
    assert exc.reason is Rejection.MALFORMED
    assert "unknown purpose" in exc.detail


def test_extra_claims_are_ignored() -> None:
    claims = claims_map()
    claims[6] = NOW - 30  # iat
    claims[-65538] = "future use"
    result = verify_credential(_signed_claims(claims), KEYS, NOW, LEEWAY)
    assert resolved(result) == make_claims()


# --- unknown_key ------------------------------------------------------------------------------


def test_credential_signed_by_an_unpublished_key_is_unknown_key() -> None:
    exc = rejection(issue_credential(STRANGER, make_claims()))
    assert exc.reason is Rejection.UNKNOWN_KEY


def test_no_published_keys_at_all_is_unknown_key() -> None:
    exc = rejection(valid_text(), keys={})
    assert exc.reason is Rejection.UNKNOWN_KEY


def test_unknown_key_is_decided_before_the_payload_is_read() -> None:
    exc = rejection(as_text(sign1(b"not cbor \x1c", key=STRANGER)))
    assert exc.reason is Rejection.UNKNOWN_KEY


# --- bad_signature ----------------------------------------------------------------------------


def _with_signature(raw: bytes, change: Callable[[bytes], bytes]) -> str:
    protected, unprotected, payload, signature = cbor2.loads(raw).value
    return as_text(cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, change(signature)])))


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_flipping_one_signature_byte_is_bad_signature(index: int) -> None:
    def flip(signature: bytes) -> bytes:
        return signature[:index] + bytes([signature[index] ^ 0x01]) + signature[index + 1 :]

    exc = rejection(_with_signature(sign1(), flip))
    assert exc.reason is Rejection.BAD_SIGNATURE


@given(st.integers(0, 63), st.integers(1, 255))
def test_any_single_byte_change_to_the_signature_is_bad_signature(index: int, mask: int) -> None:
    def change(signature: bytes) -> bytes:
        return signature[:index] + bytes([signature[index] ^ mask]) + signature[index + 1 :]

    exc = rejection(_with_signature(sign1(), change))
    assert exc.reason is Rejection.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [lambda s: s[:-1], lambda s: s + b"\x00", lambda s: b"", lambda s: b"\x00" * 64],
    ids=["63-bytes", "65-bytes", "empty", "zeros"],
)
def test_signature_of_the_wrong_length_or_zeros_is_bad_signature(change: Callable[[bytes], bytes]) -> None:
    exc = rejection(_with_signature(sign1(), change))
    assert exc.reason is Rejection.BAD_SIGNATURE


def test_payload_altered_after_signing_is_bad_signature() -> None:
    protected, unprotected, _, signature = cbor2.loads(sign1()).value
    altered = encode(make_claims(expires_at=NOW + 3600))
    raw = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, altered, signature]))
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.BAD_SIGNATURE


def test_protected_header_altered_after_signing_is_bad_signature() -> None:
    # The only change an exact header allows: another published key's kid.
    other = SigningKey.from_seed(bytes(range(64, 96)))
    _, unprotected, payload, signature = cbor2.loads(sign1()).value
    altered = protected_header(kid=other.kid)
    raw = cbor2.dumps(cbor2.CBORTag(18, [altered, unprotected, payload, signature]))
    exc = rejection(as_text(raw), keys={**KEYS, other.kid: other.verify_key(REGION)})
    assert exc.reason is Rejection.BAD_SIGNATURE


def test_signature_by_another_key_under_a_published_kid_is_bad_signature() -> None:
    protected = protected_header(kid=KEY.kid)
    payload = encode(make_claims())
    forged = STRANGER.sign(sig_structure(protected, payload))
    exc = rejection(as_text(sign1(payload, protected=protected, signature=forged)))
    assert exc.reason is Rejection.BAD_SIGNATURE


def test_key_whose_region_differs_from_iss_is_bad_signature() -> None:
    keys = {KEY.kid: KEY.verify_key(OTHER_REGION)}
    exc = rejection(valid_text(), keys=keys)
    assert exc.reason is Rejection.BAD_SIGNATURE
    assert "region" in exc.detail


def test_bad_signature_is_decided_before_the_payload_is_read() -> None:
    raw = sign1(b"not cbor \x1c", signature=b"\x00" * 64)
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.BAD_SIGNATURE


def test_anything_in_the_unsigned_unprotected_header_is_malformed() -> None:
    # RFC 9052: the unprotected bucket is not signed, so this profile keeps it empty
    # (tests/unit/crypto/test_cose_header.py has every variant).
    exc = rejection(as_text(sign1(unprotected={4: b"whatever", 99: "note"})))
    assert exc.reason is Rejection.MALFORMED
    assert "unprotected header must be empty" in exc.detail


# --- validity window --------------------------------------------------------------------------

NBF = NOW - 30
EXP = NOW + 30


@pytest.mark.parametrize("leeway", [0, LEEWAY, 60])
def test_credential_is_valid_at_exp_plus_leeway(leeway: int) -> None:
    assert resolved(verify_credential(valid_text(), KEYS, EXP + leeway, leeway)) == make_claims()


@pytest.mark.parametrize("leeway", [0, LEEWAY, 60])
def test_credential_is_expired_one_second_after_exp_plus_leeway(leeway: int) -> None:
    exc = rejection(valid_text(), now=EXP + leeway + 1, leeway=leeway)
    assert exc.reason is Rejection.EXPIRED


@pytest.mark.parametrize("leeway", [0, LEEWAY, 60])
def test_credential_is_valid_when_now_plus_leeway_equals_nbf(leeway: int) -> None:
    assert resolved(verify_credential(valid_text(), KEYS, NBF - leeway, leeway)) == make_claims()


@pytest.mark.parametrize("leeway", [0, LEEWAY, 60])
def test_credential_is_not_yet_valid_one_second_before_nbf_minus_leeway(leeway: int) -> None:
    exc = rejection(valid_text(), now=NBF - leeway - 1, leeway=leeway)
    assert exc.reason is Rejection.NOT_YET_VALID


def test_long_expired_credential_is_expired() -> None:
    assert rejection(valid_text(), now=EXP + 86_400).reason is Rejection.EXPIRED


def test_far_future_credential_is_not_yet_valid() -> None:
    assert rejection(valid_text(), now=0).reason is Rejection.NOT_YET_VALID


def test_expired_credential_with_a_bad_signature_is_bad_signature() -> None:
    exc = rejection(_with_signature(sign1(), lambda s: s[:-1] + bytes([s[-1] ^ 1])), now=EXP + 3600)
    assert exc.reason is Rejection.BAD_SIGNATURE


@given(st.integers(NBF - LEEWAY, EXP + LEEWAY))
def test_every_second_inside_the_window_with_leeway_is_valid(now: int) -> None:
    assert resolved(verify_credential(valid_text(), KEYS, now, LEEWAY)) == make_claims()


@given(st.integers(0, 2**33))
def test_outside_the_window_the_reason_depends_on_the_side(now: int) -> None:
    if NBF - LEEWAY <= now <= EXP + LEEWAY:
        return
    expected = Rejection.EXPIRED if now > EXP else Rejection.NOT_YET_VALID
    assert rejection(valid_text(), now=now).reason is expected


# --- bounded lifetime: exp - nbf at most lifetime + leeway --------------------------------------


def test_the_default_bound_is_the_services_default_lifetime_and_skew() -> None:
    defaults = Settings()
    assert (DEFAULT_LIFETIME, DEFAULT_LEEWAY) == (defaults.credential_lifetime, defaults.clock_skew) == (60, 5)


@pytest.mark.parametrize(("lifetime", "leeway"), [(60, 5), (60, 0), (30, 10), (3600, 5)])
def test_a_window_of_lifetime_plus_leeway_is_accepted_and_one_second_more_is_lifetime_exceeded(
    lifetime: int, leeway: int
) -> None:
    edge = make_claims(not_before=NOW - 10, expires_at=NOW - 10 + lifetime + leeway)
    assert resolved(verify_credential(issue_credential(KEY, edge), KEYS, NOW, leeway, lifetime)) == edge
    over = make_claims(not_before=NOW - 10, expires_at=NOW - 10 + lifetime + leeway + 1)
    exc = rejection(issue_credential(KEY, over), now=NOW, leeway=leeway, lifetime=lifetime)
    assert exc.reason is Rejection.LIFETIME_EXCEEDED
    assert f"{lifetime + leeway + 1} s" in exc.detail


YEAR = 365 * 86_400


@given(st.integers(NOW - 2 * YEAR, NOW + 2 * YEAR))
def test_a_credential_valid_for_a_year_is_lifetime_exceeded_whenever_it_is_shown(now: int) -> None:
    # Signed by the published key, so only the lifetime rule refuses it; decided before expiry.
    text = issue_credential(KEY, make_claims(not_before=NOW, expires_at=NOW + YEAR))
    assert rejection(text, now=now).reason is Rejection.LIFETIME_EXCEEDED


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(lifetime, leeway, nbf, exp - nbf, now - nbf): spans up to 10 s past the bound, times around the window."""
    lifetime, leeway = draw(st.integers(0, 3600)), draw(st.integers(0, 60))
    span = draw(st.integers(0, lifetime + leeway + 10))
    return lifetime, leeway, draw(st.integers(0, 2**31)), span, draw(st.integers(-leeway - 10, span + leeway + 10))


@given(windows())
def test_the_window_rules_and_what_they_imply(window: tuple[int, int, int, int, int]) -> None:
    lifetime, leeway, nbf, span, offset = window
    claims = make_claims(not_before=nbf, expires_at=nbf + span)
    now = nbf + offset
    try:
        check_window(claims, now, leeway, lifetime)
    except CredentialRejected as exc:
        if span > lifetime + leeway:
            assert exc.reason is Rejection.LIFETIME_EXCEEDED
        elif now > nbf + span + leeway:
            assert exc.reason is Rejection.EXPIRED
        else:
            assert now + leeway < nbf
            assert exc.reason is Rejection.NOT_YET_VALID
        return
    assert span <= lifetime + leeway
    assert nbf - leeway <= now <= nbf + span + leeway
    # nbf is never far in the past: nothing is accepted lifetime + 2 * leeway after it.
    assert now - nbf <= lifetime + 2 * leeway
    # The nonce must outlive the last accepted second, which is bounded whatever exp says.
    last = usable_until(claims, leeway, lifetime)
    assert now <= last <= now + lifetime + 3 * leeway
    check_window(claims, last, leeway, lifetime)
    with pytest.raises(CredentialRejected):
        check_window(claims, last + 1, leeway, lifetime)


@given(st.integers(0, 3600), st.integers(0, 60), st.integers(1, 10**6))
def test_an_nbf_more_than_lifetime_plus_leeway_ago_means_exp_has_passed(lifetime: int, leeway: int, ago: int) -> None:
    nbf = NOW - lifetime - leeway - ago
    for span in (0, lifetime, lifetime + leeway):
        claims = make_claims(not_before=nbf, expires_at=nbf + span)
        assert claims.expires_at < NOW  # by the lifetime rule alone
        if ago > leeway:  # and once the leeway on exp is spent too, it is expired
            with pytest.raises(CredentialRejected) as info:
                check_window(claims, NOW, leeway, lifetime)
            assert info.value.reason is Rejection.EXPIRED


def test_usable_until_never_follows_a_far_exp() -> None:
    far = make_claims(not_before=NOW, expires_at=NOW + YEAR)
    assert usable_until(far, LEEWAY, LIFETIME) == NOW + LIFETIME + 2 * LEEWAY
    issued = make_claims(not_before=NOW, expires_at=NOW + LIFETIME)
    assert usable_until(issued, LEEWAY, LIFETIME) == NOW + LIFETIME + LEEWAY


def test_an_expired_credential_valid_too_long_is_lifetime_exceeded_first() -> None:
    text = issue_credential(KEY, make_claims(not_before=NOW - YEAR, expires_at=NOW - 3600))
    assert rejection(text).reason is Rejection.LIFETIME_EXCEEDED


# --- robustness: nothing but CredentialRejected escapes ----------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.integers(-70000, 70000) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.text(max_size=80))
def test_arbitrary_text_is_rejected_as_malformed(text: str) -> None:
    assert rejection(text).reason is Rejection.MALFORMED


@given(st.lists(cbor_values, min_size=0, max_size=5), st.booleans())
def test_arbitrary_untagged_or_tagged_cbor_is_rejected_cleanly(items: list[Any], tagged: bool) -> None:
    raw = cbor2.dumps(cbor2.CBORTag(18, items) if tagged else items)
    assert rejection(as_text(raw)).reason in set(Rejection)


@given(cbor_values, cbor_values)
def test_arbitrary_protected_header_and_payload_are_rejected_cleanly(header: Any, payload: Any) -> None:
    raw = sign1(cbor2.dumps(payload), protected=cbor2.dumps(header))
    assert rejection(as_text(raw)).reason in set(Rejection)


@given(cbor_values)
def test_arbitrary_signed_claims_are_rejected_cleanly_or_verify(claims: Any) -> None:
    try:
        verify_credential(_signed_claims(claims), KEYS, NOW, LEEWAY)
    except CredentialRejected as exc:
        assert exc.reason is Rejection.MALFORMED


# CBOR semantic tags that cbor2 decodes into Python objects, inside the unauthenticated message.
# These are handled: cbor2 raises a CBORDecodeError that verify_credential maps to malformed.
@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("d823") + cbor2.dumps("("),  # tag 35 regex, invalid pattern
        bytes.fromhex("d81e") + cbor2.dumps([1, 0]),  # tag 30 rational, zero denominator
        bytes.fromhex("c1") + cbor2.dumps(1e300),  # tag 1 epoch datetime out of range
        bytes.fromhex("d825") + cbor2.dumps(b"x"),  # tag 37 UUID of the wrong length
        bytes.fromhex("d81d") + cbor2.dumps(5),  # tag 29 shared reference that does not exist
    ],
    ids=["regex-pattern", "rational-zero", "epoch-overflow", "uuid-length", "shared-ref"],
)
def test_semantic_tags_that_fail_to_decode_are_malformed(raw: bytes) -> None:
    exc = rejection(as_text(raw))
    assert exc.reason is Rejection.MALFORMED


# Unauthenticated input that makes cbor2's semantic-tag decoders raise TypeError, OverflowError
# or decimal errors must still end as `malformed`, never escape verify_credential.
UNAUTHENTICATED_CRASHES = [
    pytest.param("EC1:QER00", id="tag35-regex-of-int-TypeError"),  # d8 23 00
    pytest.param("EC1:1GRYF300000", id="tag100-date-2**31-OverflowError"),  # d8 64 1a 80000000
    pytest.param(as_text(bytes.fromhex("d864") + cbor2.dumps(1.5)), id="tag100-date-float-TypeError"),
    pytest.param("EC1:-$OJL3FGWFGWFGWVAW", id="tag4-decimal-huge-exponent-InvalidOperation"),
    pytest.param("EC1:R/OJL3FGWFGWFGWVAW", id="tag5-bigfloat-huge-exponent-Overflow"),
    pytest.param(as_text(sign1(protected=bytes.fromhex("d82300"))), id="in-protected-header-TypeError"),
]


@pytest.mark.parametrize("text", UNAUTHENTICATED_CRASHES)
def test_cbor_tag_decoder_errors_in_unauthenticated_input_are_malformed(text: str) -> None:
    try:
        verify_credential(text, KEYS, NOW, LEEWAY)
    except CredentialRejected as exc:
        assert exc.reason is Rejection.MALFORMED
    else:
        raise AssertionError("accepted")


# Lookalike types are malformed: CBOR true and 1.0 compare equal to 1 in Python, and
# str.isdigit accepts non-ASCII digits.
@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(claims_map(card=[SEALED_REF, True]), id="purpose-true"),
        pytest.param(claims_map(card=[SEALED_REF, 1.0]), id="purpose-float"),
        pytest.param({True if k == 1 else k: v for k, v in claims_map().items()}, id="iss-key-true"),
        pytest.param(claims_map(iss="\uff15\uff11\uff10\uff10\uff10\uff10"), id="iss-fullwidth-digits"),
    ],
)
def test_claims_with_lookalike_types_are_malformed(claims: dict[Any, Any]) -> None:
    with pytest.raises(CredentialRejected) as info:
        decode_claims(cbor2.dumps(claims))
    assert info.value.reason is Rejection.MALFORMED
