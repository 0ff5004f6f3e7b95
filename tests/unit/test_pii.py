"""Personal data helpers: encryption at rest, blind index, citizen ID rules, masking."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given
from hypothesis import strategies as st

from app.domain.cards.citizen_id import (
    InvalidCitizenId,
    check_character,
    mask_citizen_id,
    mask_name,
    normalise_citizen_id,
)
from app.security.pii import PiiCipher

CIPHER = PiiCipher(os.urandom(32), os.urandom(32))


@given(st.text(max_size=200))
def test_encryption_round_trips(text: str) -> None:
    assert CIPHER.decrypt(CIPHER.encrypt(text, "persons.name"), "persons.name") == text


def test_ciphertext_is_randomised_and_hides_the_value() -> None:
    one, two = CIPHER.encrypt("张三", "persons.name"), CIPHER.encrypt("张三", "persons.name")
    assert one != two
    assert "张三".encode() not in one


def test_ciphertext_is_bound_to_its_field() -> None:
    blob = CIPHER.encrypt("11010519491231002X", "persons.citizen_id")
    with pytest.raises(InvalidTag):
        CIPHER.decrypt(blob, "persons.name")


def test_tampered_ciphertext_is_refused() -> None:
    blob = bytearray(CIPHER.encrypt("张三", "persons.name"))
    blob[-1] ^= 1
    with pytest.raises(InvalidTag):
        CIPHER.decrypt(bytes(blob), "persons.name")


def test_blind_index_is_keyed_normalised_and_per_field() -> None:
    other = PiiCipher(os.urandom(32), os.urandom(32))
    value = "11010519491231002x"
    assert CIPHER.blind_index(value, "f") == CIPHER.blind_index(" 11010519491231002X ", "f")
    assert CIPHER.blind_index(value, "f") != CIPHER.blind_index(value, "g")
    assert CIPHER.blind_index(value, "f") != other.blind_index(value, "f")


def test_gb11643_example_is_valid() -> None:
    # The standard's own example number.
    assert normalise_citizen_id("11010519491231002x") == "11010519491231002X"
    assert check_character("11010519491231002") == "X"


@pytest.mark.parametrize(
    ("number", "why"),
    [
        ("110105194912310021", "check character"),
        ("11010519491331002X", "birth date"),
        ("11010519490230002X", "birth date"),
        ("01010519491231002X", "17 digits"),
        ("1101051949123100", "17 digits"),
        ("11010519491231002Y", "17 digits"),
    ],
)
def test_invalid_citizen_ids_say_why_without_echoing(number: str, why: str) -> None:
    with pytest.raises(InvalidCitizenId, match=why) as info:
        normalise_citizen_id(number)
    assert number not in str(info.value)


@given(
    st.from_regex(r"[1-9][0-9]{5}(19[5-9][0-9]|200[0-9])(0[1-9]|1[0-2])(0[1-9]|1[0-9]|2[0-8])[0-9]{3}", fullmatch=True)
)
def test_any_number_with_its_check_character_is_valid(first17: str) -> None:
    number = first17 + check_character(first17)
    assert normalise_citizen_id(number) == number
    wrong = "0" if number[-1] != "0" else "1"
    with pytest.raises(InvalidCitizenId):
        normalise_citizen_id(number[:-1] + wrong)


def test_masking() -> None:
    assert mask_citizen_id("11010519491231002X") == "1101**********002X"
    assert mask_name("张三丰") == "张**"
    assert mask_name("李") == "李*"


@given(st.from_regex(r"[0-9]{17}", fullmatch=True))
def test_check_character_is_iso_7064_mod_11_2(first17: str) -> None:
    # The textbook formula, digit by digit: the fast version must agree on every input.
    weights = [2 ** (17 - position) % 11 for position in range(17)]
    total = sum(int(digit) * weight for digit, weight in zip(first17, weights, strict=True))
    assert check_character(first17) == "10X98765432"[total % 11]


@pytest.mark.parametrize(
    "first17", ["1234567890123456", "123456789012345678", "1234567890123456X", "١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧"]
)
def test_check_character_needs_17_ascii_digits(first17: str) -> None:
    with pytest.raises(ValueError, match="17 ASCII digits"):
        check_character(first17)
