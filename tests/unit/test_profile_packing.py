"""The sealed disclosure profile's compact plaintext: every profile comes back, and a usual one is small."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from app.domain.cards.citizen_id import mask_citizen_id
from app.domain.verification.disclosure import PACKED_OTHER, Profile, pack_profile, seal_profile, unpack_profile
from app.security.pii import PiiCipher

# The CJK block as far as GB 18030 writes it in two bytes (U+9FA6 and up take four).
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5)
ID_CHARS = st.sampled_from("0123456789X")


@given(
    name=st.text(CJK, min_size=2, max_size=4),
    citizen_id=st.text(st.sampled_from("0123456789"), min_size=17, max_size=17).flatmap(
        lambda head: ID_CHARS.map(lambda last: head + last)
    ),
    region=st.text(st.sampled_from("0123456789"), min_size=6, max_size=6),
)
def test_a_usual_profile_packs_small_and_comes_back(name: str, citizen_id: str, region: str) -> None:
    profile = Profile(name, mask_citizen_id(citizen_id), region)
    packed = pack_profile(profile)
    assert packed[0] != PACKED_OTHER
    # 1 head + 4 visible ID characters' nibbles + 3 region BCD + 2 bytes per common CJK character (GB 18030).
    assert len(packed) == 8 + 2 * len(name)
    assert unpack_profile(packed) == profile


@given(name=st.text(), masked=st.text(), region=st.text())
def test_any_profile_comes_back(name: str, masked: str, region: str) -> None:
    profile = Profile(name, masked, region)
    assert unpack_profile(pack_profile(profile)) == profile


def test_names_outside_gb18030s_two_bytes_and_odd_shapes_still_come_back() -> None:
    for profile in (
        Profile("𠀀𪚥", "5101**********1234", "510000"),  # CJK extension B: 4 bytes each in GB 18030
        Profile("阿依古丽·买买提", "6501**********123X", "650000"),
        Profile("Ann", "5101*******1234", "440000"),  # a 15-digit ID, an ASCII name
        Profile("李", "abc", "51"),
    ):
        assert unpack_profile(pack_profile(profile)) == profile


def test_a_sealed_three_character_profile_fits_a_listpack_value_with_its_status() -> None:
    """The mirror's value is "A<version>." + the sealed profile; Redis keeps a hash compact up to 64 bytes."""
    pii = PiiCipher(os.urandom(32), os.urandom(32))
    sealed = seal_profile(pii, os.urandom(16), Profile("欧阳娜娜", mask_citizen_id("51010719900307123X"), "510000"))
    assert len(sealed) == 28 + 8 + 8  # AES-GCM's nonce and tag, the packed profile
    assert len(b"A123456." + sealed) <= 64
