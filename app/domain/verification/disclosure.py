"""What each verifier business type may learn from an accepted credential, written as data.

A policy names the claims a business type sees and the one card record (if any) the verify
path must fetch for them in its round trip. Nothing else is computed, so nothing else can leak:
transit gates get a pseudonym per organisation (two operators cannot join their logs), a
library a member id of its own, a park whether the card holds an annual pass here, a hospital
the holder's name, masked citizen ID and insurance region.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date
from enum import StrEnum
from typing import Literal, get_args

import msgspec

from app.domain.verification.directory import TerminalEntry
from app.security.pii import PiiCipher
from app.stores.status_mirror import CardRecord
from crypto.credential import Claims
from crypto.keys import b64url


class BusinessType(StrEnum):
    """Kinds of verifier organisation."""

    TRANSIT = "transit"
    PARK = "park"
    LIBRARY = "library"
    HOSPITAL = "hospital"
    HRSS_OFFICE = "hrss_office"
    OTHER = "other"


# The business types' API names, as a type wire models are checked and documented with (checked here).
BusinessTypeName = Literal["transit", "park", "library", "hospital", "hrss_office", "other"]
assert set(get_args(BusinessTypeName)) == {kind.value for kind in BusinessType}


class Profile(msgspec.Struct, frozen=True):
    """The holder data a hospital or HR&SS office may see, kept encrypted in the card's mirror record."""

    name: str
    citizen_id_masked: str
    insured_region: str


PARK_ANNUAL_PASS = "park_annual_pass"


def profile_field(card_ref: bytes) -> str:
    """AES-GCM associated data of a card's profile record: a record copied to another card fails."""
    return f"mirror.profile:{card_ref.hex()}"


# The sealed profile sits in the card's mirror hash field beside its status (app/stores/status_mirror.py),
# which stays in Redis's compact listpack encoding only while a value is at most 64 bytes: AES-GCM takes
# 28 of them, so the plaintext is packed, not JSON. First byte: the number of masked characters of the
# citizen ID (low 6 bits; 10 for 18-digit IDs), plus NAME_UTF8 when the name is UTF-8 rather than
# GB 18030; then the ID's 4 + 4 visible characters as nibbles (X = 10), the insured region's 6 digits as
# BCD, and the name, whose CJK characters take 2 bytes in GB 18030 (3 in UTF-8). A 3-character name
# seals to 42 bytes (JSON: 110). A profile that does not fit this shape is sealed as PACKED_OTHER +
# msgpack instead (a longer record; still correct).
NAME_UTF8 = 0x40
PACKED_OTHER = 0xFF
_NIBBLES = "0123456789X"
_VISIBLE = 4  # characters kept at each end of a masked citizen ID (see mask_citizen_id)


# _NIBBLES are hexadecimal digits with X for ten (a): packing is bytes.fromhex (a bulk import packs
# every card's profile; a character at a time this was 9 µs of the 12 a sealed profile costs).
_NIBBLE_TEXT = re.compile(r"(?:[0-9X]{2})*")
_X_AS_HEX = str.maketrans("X", "a")


def _nibbles(text: str) -> bytes | None:
    """Characters of _NIBBLES, two to a byte; None if text has another (or an odd number)."""
    if not _NIBBLE_TEXT.fullmatch(text):
        return None
    return bytes.fromhex(text.translate(_X_AS_HEX))


def _unnibble(data: bytes) -> str:
    return "".join(_NIBBLES[byte >> 4] + _NIBBLES[byte & 15] for byte in data)


def pack_profile(profile: Profile) -> bytes:
    """The profile's compact plaintext (see NAME_UTF8 above for the layout)."""
    masked = profile.citizen_id_masked
    stars = len(masked) - 2 * _VISIBLE
    visible = _nibbles(masked[:_VISIBLE] + masked[-_VISIBLE:]) if 0 < stars < NAME_UTF8 else None
    region = _nibbles(profile.insured_region) if len(profile.insured_region) == 6 else None
    if visible is None or region is None or masked[_VISIBLE:-_VISIBLE] != "*" * stars:
        return bytes([PACKED_OTHER]) + msgspec.msgpack.encode(profile)
    name = profile.name.encode("gb18030")
    if name.decode("gb18030") != profile.name:
        name, stars = profile.name.encode(), stars | NAME_UTF8
    return bytes([stars]) + visible + region + name


def unpack_profile(plaintext: bytes) -> Profile:
    """The profile from its compact plaintext (`pack_profile`)."""
    head = plaintext[0]
    if head == PACKED_OTHER:
        return msgspec.msgpack.decode(plaintext[1:], type=Profile)
    visible, stars = _unnibble(plaintext[1:5]), head & (NAME_UTF8 - 1)
    name = plaintext[8:].decode("utf-8" if head & NAME_UTF8 else "gb18030")
    return Profile(name, visible[:_VISIBLE] + "*" * stars + visible[_VISIBLE:], _unnibble(plaintext[5:8]))


def seal_profile(pii: PiiCipher, card_ref: bytes, profile: Profile) -> bytes:
    """The profile record as stored in the mirror: AES-GCM of its compact plaintext, bound to the card."""
    return pii.encrypt_bytes(pack_profile(profile), profile_field(card_ref))


def entitlements_record(passes: list[tuple[str, date]]) -> bytes | None:
    """The entitlements record: region → last valid day of each current annual pass; None if none."""
    if not passes:
        return None
    latest: dict[str, date] = {}
    for region, until in passes:
        latest[region] = max(latest.get(region, until), until)
    return json.dumps({PARK_ANNUAL_PASS: {region: until.isoformat() for region, until in latest.items()}}).encode()


@dataclass(frozen=True, slots=True)
class Disclosing:
    """Everything a claim may be computed from."""

    claims: Claims
    terminal: TerminalEntry
    record: bytes | None
    pseudonym_key: bytes
    pii: PiiCipher
    today: date
    profile: Profile | None = None


def _keyed(source: Disclosing, label: bytes) -> bytes:
    message = label + source.terminal.organisation_id.bytes + source.claims.card_ref
    return hmac.new(source.pseudonym_key, message, hashlib.sha256).digest()


def _card_pseudonym(source: Disclosing) -> str | None:
    """Stable per card within one organisation, unlinkable across organisations."""
    return b64url(_keyed(source, b"")[:16])


def _member_id(source: Disclosing) -> str | None:
    """A library's own member number for the card: 16 characters of base32, per organisation."""
    return base64.b32encode(_keyed(source, b"library-member\x00")[:10]).decode()


def _open_profile(source: Disclosing) -> Profile:
    # The store fails closed (card_unknown) when the profile is missing, so it is here.
    assert source.record is not None
    return unpack_profile(source.pii.decrypt_bytes(source.record, profile_field(source.claims.card_ref)))


def _profile(source: Disclosing) -> Profile:
    assert source.profile is not None  # opened once by `disclose`
    return source.profile


def _annual_pass_until(source: Disclosing) -> str | None:
    """The last day of the card's annual pass valid in the park's province, or None."""
    if source.record is None:
        return None
    passes: dict[str, str] = json.loads(source.record).get(PARK_ANNUAL_PASS, {})
    valid = [
        until
        for region, until in passes.items()
        if region[:2] == source.terminal.region[:2] and until >= source.today.isoformat()
    ]
    return max(valid, default=None)


ClaimSource = Callable[[Disclosing], str | None]

CLAIM_SOURCES: Mapping[str, ClaimSource] = {
    "card_pseudonym": _card_pseudonym,
    "member_id": _member_id,
    "card_region": lambda source: source.claims.region,
    "holder_name": lambda source: _profile(source).name,
    "citizen_id_masked": lambda source: _profile(source).citizen_id_masked,
    "insurance_region": lambda source: _profile(source).insured_region,
    "annual_pass_until": _annual_pass_until,
}


@dataclass(frozen=True, slots=True)
class Policy:
    """The claims a business type sees, and the card record they are computed from."""

    claims: tuple[str, ...]
    record: CardRecord = CardRecord.NONE


DISCLOSURE_POLICY: Mapping[BusinessType, Policy] = {
    BusinessType.TRANSIT: Policy(("card_pseudonym",)),
    BusinessType.PARK: Policy(("annual_pass_until",), CardRecord.ENTITLEMENTS),
    BusinessType.LIBRARY: Policy(("member_id",)),
    BusinessType.HOSPITAL: Policy(("holder_name", "citizen_id_masked", "insurance_region"), CardRecord.PROFILE),
    BusinessType.HRSS_OFFICE: Policy(("holder_name", "citizen_id_masked", "card_region"), CardRecord.PROFILE),
    BusinessType.OTHER: Policy(()),
}


def policy_for(terminal: TerminalEntry) -> Policy:
    """The terminal's organisation's policy."""
    return DISCLOSURE_POLICY[BusinessType(terminal.business_type)]


def disclose(source: Disclosing) -> dict[str, str | None]:
    """The claims the terminal's business type may see, and nothing else."""
    policy = policy_for(source.terminal)
    if policy.record is CardRecord.PROFILE:
        source = replace(source, profile=_open_profile(source))
    return {name: CLAIM_SOURCES[name](source) for name in policy.claims}
