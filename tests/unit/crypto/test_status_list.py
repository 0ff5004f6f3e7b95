"""Token Status List, CWT form: bit packing, compression, the signed token, and hostile tokens.

The packing is checked against the draft's own examples and test vector
(draft-ietf-oauth-status-list, "Status List" and "Test vectors for Status List encoding") and
against a bit-by-bit rebuild of its definition written here, not taken from the module.
"""

from __future__ import annotations

import zlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage, Sign1Message

from crypto.base45 import b45decode
from crypto.credential import PREFIX, Claims, Purpose, Rejection, issue_credential
from crypto.keys import SigningKey, VerifyKey
from crypto.status_list import (
    MAX_LIST_BYTES,
    MAX_TOKEN_BYTES,
    TYP,
    CardStatusCode,
    StatusList,
    StatusListRejected,
    VerifiedStatusList,
    open_status_list,
    sign_status_list,
)
from tests.unit.crypto.test_credential import cbor_values

SEED = bytes(range(32))
KEY = SigningKey.from_seed(SEED)
STRANGER = SigningKey.from_seed(bytes(range(32, 64)))
REGION = "510000"
OTHER_REGION = "500000"
KEYS: dict[bytes, VerifyKey] = {KEY.kid: KEY.verify_key(REGION)}
SUBJECT = "https://ecard.example/v1/status-lists/510000"
IAT = 1_750_000_000
EXP = IAT + 86_400
TTL = 3_600
STATUSES = [0, 1, 2, 3, 0, 0, 1]  # seven cards: one padding slot in the second byte


def token(statuses: Any = STATUSES, key: SigningKey = KEY, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "region": REGION,
        "subject": SUBJECT,
        "status_list": StatusList.from_statuses(statuses),
        "issued_at": IAT,
        "expires_at": EXP,
        "ttl": TTL,
    }
    fields.update(overrides)
    return sign_status_list(key, **fields)


def naive_pack(statuses: list[int], bits: int) -> bytes:
    """The draft's definition, bit by bit: index i's bits start at bit i*bits, LSB first in a byte."""
    out = bytearray(-(-len(statuses) * bits // 8))
    for index, status in enumerate(statuses):
        for bit in range(bits):
            if status >> bit & 1:
                position = index * bits + bit
                out[position // 8] |= 1 << (position % 8)
    return bytes(out)


def claims_map(**overrides: Any) -> dict[int, Any]:
    claims: dict[int, Any] = {
        1: REGION,
        2: SUBJECT,
        6: IAT,
        4: EXP,
        65534: TTL,
        65533: {"bits": 2, "lst": StatusList.from_statuses(STATUSES).compress()},
    }
    names = {"iss": 1, "sub": 2, "iat": 6, "exp": 4, "ttl": 65534, "status_list": 65533}
    for name, value in overrides.items():
        if value is None:
            del claims[names[name]]
        else:
            claims[names[name]] = value
    return claims


def signed(
    payload: Any, *, protected: Any = None, key: SigningKey = KEY, signature: bytes | None = None, tag: int = 18
) -> bytes:
    """A COSE_Sign1 built by hand (RFC 9052 Sig_structure), correctly signed unless given a signature."""
    if not isinstance(payload, bytes):
        payload = cbor2.dumps(payload)
    if protected is None:
        protected = {1: -8, 4: key.kid, 16: TYP}
    protected_bytes = protected if isinstance(protected, bytes) else cbor2.dumps(protected)
    if signature is None:
        signature = key.sign(cbor2.dumps(["Signature1", protected_bytes, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(tag, [protected_bytes, {}, payload, signature]))


def rejection(raw: Any, keys: dict[bytes, VerifyKey] = KEYS, **kwargs: Any) -> StatusListRejected:
    with pytest.raises(StatusListRejected) as info:
        open_status_list(raw, keys, **kwargs)
    return info.value


# --- packing: the draft's examples and test vector ----------------------------------------------

DRAFT_1BIT = [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]
DRAFT_2BIT = [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3]

# The 2-bit test vector of the draft: 2**20 entries, all VALID but these, as a CBOR StatusList.
DRAFT_2BIT_LONG = {
    0: 1,
    1993: 2,
    25460: 1,
    159495: 3,
    495669: 1,
    554353: 1,
    645645: 2,
    723232: 1,
    854545: 1,
    934534: 2,
    1000345: 3,
}
DRAFT_2BIT_LONG_CBOR = bytes.fromhex(
    "a2646269747302636c737459013d78daeddb310d00211000412ea1a04004fe5520ed357c28c81d3312b6df68bc654800"
    "00000000406e21010000000000000000000000000000000000000000000000000000000000000040795b020000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000080f4ba0400000000000000000000000000406d764a"
    "000000000000000000000000000000000000000000e0922101000000000000000000000000000000000000fc13120000"
    "0000000000000000000000000000000000000000000000000000000000c0912e01000000000000000000000000000000"
    "000000c07d4b02000000000000000000000000000000a8614a0000000000000000000000406a1fcd60010c"
)


def test_draft_1_bit_example_packs_and_compresses_as_published() -> None:
    status_list = StatusList.from_statuses(DRAFT_1BIT, bits=1, padding=0)
    assert status_list.packed == bytes([0xB9, 0xA3])
    assert status_list.compress() == bytes.fromhex("78dadbb918000217015d")


def test_draft_2_bit_example_packs_and_compresses_as_published() -> None:
    status_list = StatusList.from_statuses(DRAFT_2BIT)
    assert status_list.packed == bytes([0xC9, 0x44, 0xF9])
    assert status_list.compress() == bytes.fromhex("78da3be9f2130003df0207")
    assert [status_list.get(i) for i in range(12)] == DRAFT_2BIT


def test_draft_2_bit_example_as_the_status_list_claim_of_a_token() -> None:
    claims = cbor2.loads(cbor2.loads(token(DRAFT_2BIT)).value[2])
    assert cbor2.dumps(claims[65533]) == bytes.fromhex("a2646269747302636c73744b78da3be9f2130003df0207")


def test_draft_2_bit_test_vector_decodes_to_its_statuses() -> None:
    document = cbor2.loads(DRAFT_2BIT_LONG_CBOR)
    status_list = StatusList.decompress(document["lst"], document["bits"])
    assert len(status_list) == 2**20
    assert {i: status_list.get(i) for i in DRAFT_2BIT_LONG} == DRAFT_2BIT_LONG
    assert sum(1 for status in status_list.statuses() if status) == len(DRAFT_2BIT_LONG)


def test_draft_2_bit_test_vector_is_reproduced_byte_for_byte() -> None:
    status_list = StatusList.from_statuses(DRAFT_2BIT_LONG, size=2**20)
    assert cbor2.dumps({"bits": 2, "lst": status_list.compress()}) == DRAFT_2BIT_LONG_CBOR


# --- packing: properties -----------------------------------------------------------------------


@st.composite
def status_lists(draw: st.DrawFn) -> tuple[int, list[int], int]:
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    statuses = draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    padding = draw(st.integers(0, 2**bits - 1))
    return bits, statuses, padding


@given(status_lists())
def test_packing_round_trips_and_matches_the_bitwise_definition(case: tuple[int, list[int], int]) -> None:
    bits, statuses, padding = case
    status_list = StatusList.from_statuses(statuses, bits=bits, padding=padding)
    per_byte = 8 // bits
    spare = -len(statuses) % per_byte
    assert status_list.packed == naive_pack([*statuses, *[padding] * spare], bits)
    assert len(status_list) == len(statuses) + spare
    assert [status_list.get(i) for i in range(len(statuses))] == statuses
    assert status_list.statuses() == bytes(statuses) + bytes([padding]) * spare


@given(st.lists(st.integers(0, 3), max_size=200), st.integers(0, 3))
def test_two_bit_lists_of_any_length_including_zero_and_non_multiples_of_4(statuses: list[int], padding: int) -> None:
    status_list = StatusList.from_statuses(statuses, padding=padding)
    assert len(status_list.packed) == (len(statuses) + 3) // 4
    assert [status_list.get(i) for i in range(len(statuses))] == statuses
    assert all(status_list.get(i) == padding for i in range(len(statuses), len(status_list)))


@given(status_lists())
def test_compression_round_trips(case: tuple[int, list[int], int]) -> None:
    bits, statuses, padding = case
    status_list = StatusList.from_statuses(statuses, bits=bits, padding=padding)
    lst = status_list.compress()
    assert lst[:2] == b"\x78\xda"  # ZLIB header: DEFLATE, 32K window, maximum compression
    assert zlib.decompress(lst) == status_list.packed
    assert StatusList.decompress(lst, bits) == status_list


@given(st.dictionaries(st.integers(0, 99), st.integers(0, 3), max_size=30), st.integers(100, 130))
def test_a_mapping_packs_like_the_sequence_it_stands_for(statuses: dict[int, int], size: int) -> None:
    dense = [statuses.get(i, 0) for i in range(size)]
    assert StatusList.from_statuses(statuses, size=size) == StatusList.from_statuses(dense)


def test_the_default_padding_is_pending_activation_not_valid() -> None:
    # Seven cards: slot 7 is no card's yet. A card given index 7 after signing must not pass as VALID.
    status_list = StatusList.from_statuses(STATUSES)
    assert len(status_list) == 8
    assert status_list.get(7) == CardStatusCode.PENDING_ACTIVATION


def test_an_empty_list_has_no_entries() -> None:
    status_list = StatusList.from_statuses([])
    assert status_list.packed == b""
    assert len(status_list) == 0
    assert StatusList.decompress(status_list.compress(), 2) == status_list
    with pytest.raises(IndexError):
        status_list.get(0)


@pytest.mark.parametrize("index", [-1, 8, 9, 2**32])
def test_get_outside_the_list_raises_index_error(index: int) -> None:
    with pytest.raises(IndexError):
        StatusList.from_statuses(STATUSES).get(index)


@pytest.mark.parametrize(
    ("statuses", "kwargs", "message"),
    [
        ([4], {}, "does not fit"),
        ([2], {"bits": 1, "padding": 0}, "does not fit"),
        ([0], {"bits": 1}, "padding 3 does not fit"),
        ([0], {"padding": 4}, "padding 4 does not fit"),
        ([0], {"bits": 3}, "bits must be"),
        ([0], {"size": 4}, "only with a mapping"),
        ({5: 1}, {"size": 5}, "outside the list"),
        ({-1: 1}, {"size": 5}, "outside the list"),
        ({0: 4}, {}, "does not fit"),
        ([256], {"bits": 8}, "range"),
    ],
)
def test_from_statuses_rejects_what_does_not_fit(statuses: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StatusList.from_statuses(statuses, **kwargs)


@pytest.mark.parametrize("bits", [0, 3, 16, True, 2.0])
def test_status_list_refuses_other_bit_sizes(bits: Any) -> None:
    with pytest.raises(ValueError, match="bits must be"):
        StatusList(bits=bits, packed=b"")


def test_card_status_codes_are_the_drafts_status_types() -> None:
    assert [(code.value, code.label) for code in CardStatusCode] == [
        (0, "valid"),
        (1, "invalid"),
        (2, "suspended"),
        (3, "pending_activation"),
    ]


# --- decompression of hostile lst ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("lst", "message"),
    [
        (b"", "truncated"),
        (b"\x00\x01\x02", "not ZLIB"),
        (zlib.compress(b"\x00" * 10)[:-1], "truncated"),  # Adler-32 cut short
        (zlib.compress(b"\x00" * 10)[:-4] + b"\x00\x00\x00\x00", "not ZLIB"),  # wrong Adler-32
        (zlib.compress(b"\x00" * 10) + b"\x00", "trailing bytes"),
        (zlib.compress(b"\x00" * 10) * 2, "trailing bytes"),
    ],
    ids=["empty", "garbage", "truncated", "bad-checksum", "trailing-byte", "two-streams"],
)
def test_decompress_rejects_anything_but_one_whole_zlib_stream(lst: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StatusList.decompress(lst, 2)


@pytest.mark.parametrize("wbits", [-15, 31], ids=["raw-deflate", "gzip"])
def test_decompress_rejects_deflate_in_other_containers(wbits: int) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    lst = compressor.compress(b"\x00" * 10) + compressor.flush()
    with pytest.raises(ValueError, match="not ZLIB"):
        StatusList.decompress(lst, 2)


def test_decompress_accepts_exactly_the_limit_and_refuses_one_byte_more() -> None:
    assert len(StatusList.decompress(zlib.compress(b"\x00" * 1000, 9), 2, max_bytes=1000).packed) == 1000
    with pytest.raises(ValueError, match="more than 1000 bytes"):
        StatusList.decompress(zlib.compress(b"\x00" * 1001, 9), 2, max_bytes=1000)


def test_a_zlib_bomb_past_64_mib_is_refused_by_default() -> None:
    bomb = zlib.compress(b"\x00" * (MAX_LIST_BYTES + 1), 9)
    assert len(bomb) < 100_000  # a ratio above 600:1
    with pytest.raises(ValueError, match="more than 67108864 bytes"):
        StatusList.decompress(bomb, 2)


# --- the token ---------------------------------------------------------------------------------


def test_signed_token_opens_with_its_fields() -> None:
    opened = open_status_list(token(), KEYS)
    assert isinstance(opened, VerifiedStatusList)
    assert opened.subject == SUBJECT
    assert opened.region == REGION
    assert (opened.issued_at, opened.expires_at, opened.ttl) == (IAT, EXP, TTL)
    assert opened.status_list == StatusList.from_statuses(STATUSES)
    assert opened.key == KEYS[KEY.kid]
    assert opened.kid == KEY.kid


def test_token_has_the_documented_layout() -> None:
    message = cbor2.loads(token())
    assert message.tag == 18
    protected, unprotected, payload, signature = message.value
    assert cbor2.loads(protected) == {1: -8, 4: KEY.kid, 16: "application/statuslist+cwt"}
    assert unprotected == {}
    assert cbor2.loads(payload) == claims_map()
    assert list(cbor2.loads(payload)) == [1, 2, 6, 4, 65534, 65533]
    assert KEYS[KEY.kid].verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))


def test_signing_is_deterministic() -> None:
    assert token() == token()


@pytest.mark.parametrize(
    ("now", "leeway", "stale"),
    [(EXP, 0, False), (EXP + 1, 0, True), (EXP + 5, 5, False), (EXP + 6, 5, True), (IAT, 0, False)],
)
def test_a_list_is_stale_only_after_exp_plus_leeway(now: int, leeway: int, stale: bool) -> None:
    assert open_status_list(token(), KEYS).is_stale(now, leeway) is stale


def test_pycose_verifies_a_signed_token() -> None:
    message = CoseMessage.decode(token())
    assert isinstance(message, Sign1Message)
    message.key = OKPKey(crv=Ed25519, x=KEY.public)
    assert message.verify_signature() is True
    assert cbor2.loads(message.payload) == claims_map()


def test_a_token_signed_by_pycose_opens_here() -> None:
    message = Sign1Message(
        phdr={Algorithm: EdDSA, KID: KEY.kid, 16: TYP},
        payload=cbor2.dumps(claims_map()),
        key=OKPKey(crv=Ed25519, d=SEED, x=KEY.public),
    )
    opened = open_status_list(message.encode(tag=True, sign=True), KEYS)
    assert opened.status_list == StatusList.from_statuses(STATUSES)


def test_ttl_is_optional_when_reading() -> None:
    assert open_status_list(signed(claims_map(ttl=None)), KEYS).ttl is None


def test_other_claims_and_status_list_members_are_ignored() -> None:
    claims = claims_map()
    claims[65533]["aggregation_uri"] = "https://ecard.example/v1/status-lists"
    claims[-70000] = "future use"
    assert open_status_list(signed(claims), KEYS).status_list == StatusList.from_statuses(STATUSES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"region": "51000"}, "region"),
        ({"subject": ""}, "subject"),
        ({"subject": "x" * 2049}, "subject"),
        ({"issued_at": EXP + 1}, "issued_at"),
        ({"issued_at": -1}, "issued_at"),
        ({"expires_at": 2**32}, "issued_at"),
        ({"ttl": 0}, "ttl"),
    ],
)
def test_sign_status_list_refuses_bad_arguments(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        token(**overrides)


# --- signature, key, region --------------------------------------------------------------------


@given(st.integers(0, 63), st.integers(1, 255))
def test_any_change_to_the_signature_is_bad_signature(index: int, mask: int) -> None:
    protected, unprotected, payload, signature = cbor2.loads(token()).value
    changed = signature[:index] + bytes([signature[index] ^ mask]) + signature[index + 1 :]
    raw = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, changed]))
    assert rejection(raw).reason is Rejection.BAD_SIGNATURE


def test_a_status_changed_after_signing_is_bad_signature() -> None:
    protected, unprotected, _, signature = cbor2.loads(token()).value
    revoked_card_valid = cbor2.dumps(
        claims_map(status_list={"bits": 2, "lst": StatusList.from_statuses([0] * 7).compress()})
    )
    raw = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, revoked_card_valid, signature]))
    assert rejection(raw).reason is Rejection.BAD_SIGNATURE


def test_a_token_signed_by_an_unpublished_key_is_unknown_key() -> None:
    exc = rejection(token(key=STRANGER))
    assert exc.reason is Rejection.UNKNOWN_KEY


def test_a_key_published_for_another_region_is_bad_signature() -> None:
    exc = rejection(token(), keys={KEY.kid: KEY.verify_key(OTHER_REGION)})
    assert exc.reason is Rejection.BAD_SIGNATURE
    assert "region" in exc.detail


def test_a_list_naming_another_region_than_its_key_is_bad_signature() -> None:
    exc = rejection(token(region=OTHER_REGION))
    assert exc.reason is Rejection.BAD_SIGNATURE
    assert "region" in exc.detail


def test_bad_signature_is_decided_before_the_payload_is_read() -> None:
    exc = rejection(signed(b"\x1c not cbor", signature=b"\x00" * 64))
    assert exc.reason is Rejection.BAD_SIGNATURE


# --- hostile tokens: nothing but StatusListRejected escapes --------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 2, 10, 40, -65, -1])
def test_a_truncated_token_is_malformed(cut: int) -> None:
    raw = token()
    exc = rejection(raw[:cut])
    assert exc.reason is Rejection.MALFORMED
    assert "not CBOR" in exc.detail


@given(st.data())
def test_any_prefix_of_a_token_is_malformed(data: st.DataObject) -> None:
    raw = token()
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert rejection(raw[:cut]).reason is Rejection.MALFORMED


@pytest.mark.parametrize("value", [None, "token", bytearray(b"\xd2"), 42, b"\x00" * (MAX_TOKEN_BYTES + 1)])
def test_input_that_is_not_bytes_or_too_long_is_malformed(value: Any) -> None:
    exc = rejection(value)
    assert exc.reason is Rejection.MALFORMED
    assert "missing or too long" in exc.detail


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (token() + b"\x00", "trailing bytes"),
        (cbor2.dumps(cbor2.loads(token()).value), "tagged COSE_Sign1"),
        (signed(claims_map(), tag=17), "tagged COSE_Sign1"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])), "array of four"),
        (cbor2.dumps(cbor2.CBORTag(18, [{}, {}, b"", b""])), "wrong types"),
        (signed(claims_map(), protected=b"\x1c"), "protected header is not CBOR"),
        (signed(claims_map(), protected={1: -7, 4: KEY.kid, 16: TYP}), "alg EdDSA"),
        (signed(claims_map(), protected={1: -8, 16: TYP}), "8-byte kid"),
        (signed(claims_map(), protected={1: -8, 4: KEY.kid}), "typ"),
        (signed(claims_map(), protected={1: -8, 4: KEY.kid, 16: "application/cwt"}), "typ"),
        (signed(claims_map(), protected={1: -8, 4: KEY.kid, 16: 61}), "typ"),
        (bytes.fromhex("d82300"), "not CBOR"),  # tag 35 regex of an integer: cbor2 raises TypeError
        (bytes.fromhex("9bffffffffffffffff"), "not CBOR"),  # an array of 2**64 - 1 items
        (bytes.fromhex("5bffffffffffffffff"), "not CBOR"),  # a byte string of 2**64 - 1 bytes
    ],
    ids=[
        "trailing-bytes",
        "untagged",
        "mac0-tag",
        "three-items",
        "protected-as-map",
        "protected-not-cbor",
        "es256",
        "no-kid",
        "no-typ",
        "typ-cwt",
        "typ-cwt-tag",
        "tag-decoder-error",
        "huge-array",
        "huge-bytes",
    ],
)
def test_structurally_wrong_tokens_are_malformed(raw: bytes, detail: str) -> None:
    exc = rejection(raw)
    assert exc.reason is Rejection.MALFORMED
    assert detail in exc.detail


def test_a_credential_is_not_a_status_list() -> None:
    claims = Claims(b"\x00" * 16, b"\x00" * 7, REGION, Purpose.TRANSIT, IAT, EXP)
    text = issue_credential(KEY, claims)
    exc = rejection(b45decode(text[len(PREFIX) :]))
    assert exc.reason is Rejection.MALFORMED
    assert "typ" in exc.detail


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        (b"\x1c", "not CBOR"),
        ([1, 2], "claims map"),
        ({"sub": SUBJECT}, "claims map"),
        ({True: REGION}, "claims map"),
        (claims_map(iss=None), "iss"),
        (claims_map(iss=510000), "iss"),
        (claims_map(iss="\uff15\uff11\uff10\uff10\uff10\uff10"), "iss"),
        (claims_map(sub=None), "sub"),
        (claims_map(sub=""), "sub"),
        (claims_map(sub=b"https://x"), "sub"),
        (claims_map(iat=None), "iat"),
        (claims_map(iat=float(IAT)), "iat"),
        (claims_map(iat=True), "iat"),
        (claims_map(iat=-1), "iat"),
        (claims_map(exp=None), "exp"),
        (claims_map(exp=2**32), "exp"),
        (claims_map(exp=str(EXP)), "exp"),
        (claims_map(exp=IAT - 1), "exp is before iat"),
        (claims_map(ttl=0), "ttl"),
        (claims_map(ttl=-5), "ttl"),
        (claims_map(ttl=1.5), "ttl"),
        (claims_map(ttl=True), "ttl"),
        (claims_map(status_list=None), "status_list claim"),
        (claims_map(status_list=[2, b""]), "status_list claim"),
        (claims_map(status_list={"lst": zlib.compress(b"")}), "bits"),
        (claims_map(status_list={"bits": 3, "lst": zlib.compress(b"")}), "bits"),
        (claims_map(status_list={"bits": 2.0, "lst": zlib.compress(b"")}), "bits"),
        (claims_map(status_list={"bits": True, "lst": zlib.compress(b"")}), "bits"),
        (claims_map(status_list={"bits": 2}), "lst"),
        (claims_map(status_list={"bits": 2, "lst": zlib.compress(b"").hex()}), "lst"),
        (claims_map(status_list={"bits": 2, "lst": b"\x00\x01"}), "not ZLIB"),
        (claims_map(status_list={"bits": 2, "lst": zlib.compress(b"\x00")[:-1]}), "truncated"),
    ],
    ids=lambda value: None if isinstance(value, str) else repr(value)[:30],
)
def test_signed_claims_of_the_wrong_type_or_shape_are_malformed(claims: Any, detail: str) -> None:
    exc = rejection(signed(claims))
    assert exc.reason is Rejection.MALFORMED
    assert detail in exc.detail


def test_a_signed_zlib_bomb_is_malformed_without_inflating_it_all() -> None:
    bomb = zlib.compress(b"\x00" * 10_000_001, 9)
    exc = rejection(signed(claims_map(status_list={"bits": 2, "lst": bomb})), max_list_bytes=10_000_000)
    assert exc.reason is Rejection.MALFORMED
    assert "more than 10000000 bytes" in exc.detail


@given(cbor_values)
def test_arbitrary_signed_claims_are_rejected_cleanly(claims: Any) -> None:
    assert rejection(signed(claims)).reason is Rejection.MALFORMED


@given(cbor_values, cbor_values)
def test_arbitrary_protected_headers_and_payloads_are_rejected_cleanly(header: Any, payload: Any) -> None:
    assert rejection(signed(payload, protected=header)).reason in set(Rejection)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_cleanly(raw: bytes) -> None:
    assert rejection(raw).reason is Rejection.MALFORMED


@given(st.binary(max_size=64), st.sampled_from([1, 2, 4, 8]))
def test_any_signed_bits_and_lst_pair_opens_to_a_list_of_the_matching_length(packed: bytes, bits: int) -> None:
    lst = zlib.compress(packed, 9)
    opened = open_status_list(signed(claims_map(status_list={"bits": bits, "lst": lst})), KEYS)
    assert opened.status_list.packed == packed
    assert len(opened.status_list) == len(packed) * 8 // bits
