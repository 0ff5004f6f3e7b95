"""Base45 codec (RFC 9285): the RFC's examples, round-trip properties, and every rejection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.base45 import ALPHABET, Base45Error, b45decode, b45encode

# RFC 9285 section 4.
RFC_EXAMPLES = [
    (b"AB", "BB8"),
    (b"Hello!!", "%69 VD92EX0"),
    (b"base-45", "UJCLQE7W581"),
    (b"ietf!", "QED8WEX0"),
]


@pytest.mark.parametrize(("data", "text"), RFC_EXAMPLES)
def test_encode_matches_rfc_9285_examples(data: bytes, text: str) -> None:
    assert b45encode(data) == text


@pytest.mark.parametrize(("data", "text"), RFC_EXAMPLES)
def test_decode_matches_rfc_9285_examples(data: bytes, text: str) -> None:
    assert b45decode(text) == data


def test_empty_input_round_trips_to_empty_text() -> None:
    assert b45encode(b"") == ""
    assert b45decode("") == b""


def test_alphabet_is_the_qr_alphanumeric_set() -> None:
    assert ALPHABET == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
    assert len(set(ALPHABET)) == 45


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("FGW", b"\xff\xff"),  # 15 + 16*45 + 32*2025 = 65535, the largest triplet
        ("U5", b"\xff"),  # 30 + 5*45 = 255, the largest final pair
        ("000", b"\x00\x00"),
        ("00", b"\x00"),
    ],
)
def test_decode_accepts_the_largest_and_smallest_values(text: str, data: bytes) -> None:
    assert b45decode(text) == data
    assert b45encode(data) == text


@given(st.binary(max_size=512))
def test_any_bytes_round_trip(data: bytes) -> None:
    assert b45decode(b45encode(data)) == data


@given(st.binary(max_size=512))
def test_encoding_uses_only_the_alphabet_and_has_the_expected_length(data: bytes) -> None:
    text = b45encode(data)
    assert set(text) <= set(ALPHABET)
    assert len(text) == 3 * (len(data) // 2) + 2 * (len(data) % 2)


@given(st.text(alphabet=ALPHABET, max_size=60))
def test_any_decodable_text_is_the_unique_encoding_of_its_bytes(text: str) -> None:
    try:
        data = b45decode(text)
    except Base45Error:
        return
    assert b45encode(data) == text


@given(st.text(max_size=60))
def test_arbitrary_text_decodes_or_raises_base45_error(text: str) -> None:
    try:
        data = b45decode(text)
    except Base45Error:
        return
    assert isinstance(data, bytes)


def test_base45_error_is_a_value_error() -> None:
    assert issubclass(Base45Error, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "bb8",  # lower case is not in the alphabet
        "BB8bb8",
        "BB\t",
        "BB8\n",
        "BB_",
        "BB8=",
    ],
)
def test_decode_rejects_characters_outside_the_alphabet(text: str) -> None:
    with pytest.raises(Base45Error, match="not in the Base45 alphabet"):
        b45decode(text)


@pytest.mark.parametrize("text", ["BBÄ", "BB8é0", "日本", "BB\u00a0"])
def test_decode_rejects_non_ascii_text(text: str) -> None:
    with pytest.raises(Base45Error, match="ASCII"):
        b45decode(text)


@pytest.mark.parametrize("text", ["A", "BB8A", "QED8WEX0AA"])
def test_decode_rejects_a_dangling_character(text: str) -> None:
    assert len(text) % 3 == 1
    with pytest.raises(Base45Error, match="dangling"):
        b45decode(text)


@pytest.mark.parametrize("text", ["GGW", "BB8GGW", ":::"])
def test_decode_rejects_a_triplet_above_65535(text: str) -> None:
    # G=16, W=32: 16 + 16*45 + 32*2025 = 65536; ":::" is 44 * (1 + 45 + 2025) = 91124.
    with pytest.raises(Base45Error, match="above 65535"):
        b45decode(text)


@pytest.mark.parametrize("text", ["V5", "GG", "::", "BB8V5"])
def test_decode_rejects_a_final_pair_above_255(text: str) -> None:
    # V=31: 31 + 5*45 = 256, one more than "U5"; G=16: 16 + 16*45 = 736.
    with pytest.raises(Base45Error, match="above 255"):
        b45decode(text)
