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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date
from enum import StrEnum

import msgspec

from app.domain.verification.directory import TerminalEntry
from app.pii import PiiCipher
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


class Profile(msgspec.Struct, frozen=True):
    """The holder data a hospital or HR&SS office may see, kept encrypted in the card's mirror record."""

    name: str
    citizen_id_masked: str
    insured_region: str


PARK_ANNUAL_PASS = "park_annual_pass"


def profile_field(card_ref: bytes) -> str:
    """AES-GCM associated data of a card's profile record: a record copied to another card fails."""
    return f"mirror.profile:{card_ref.hex()}"


def seal_profile(pii: PiiCipher, card_ref: bytes, profile: Profile) -> bytes:
    """The profile record as stored in the mirror."""
    return pii.encrypt_bytes(msgspec.json.encode(profile), profile_field(card_ref))


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
    plaintext = source.pii.decrypt_bytes(source.record, profile_field(source.claims.card_ref))
    return msgspec.json.decode(plaintext, type=Profile)


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
