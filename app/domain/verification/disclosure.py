"""What each verifier business type may learn from an accepted credential, written as data.

Every claim here is computed on the hot path from the credential and the terminal alone; no
personal data is available there, so none can leak. (Holder name and masked citizen ID for
hospitals need a store of their own on the hot path and come with the verifier work.)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from enum import StrEnum

from app.domain.verification.directory import TerminalEntry
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


ClaimSource = Callable[[Claims, TerminalEntry, bytes], str]


def _card_pseudonym(claims: Claims, terminal: TerminalEntry, key: bytes) -> str:
    """Stable per card within one organisation, unlinkable across organisations."""
    message = terminal.organisation_id.bytes + claims.card_ref
    return b64url(hmac.new(key, message, hashlib.sha256).digest()[:16])


CLAIM_SOURCES: Mapping[str, ClaimSource] = {
    "card_pseudonym": _card_pseudonym,
    "card_region": lambda claims, _terminal, _key: claims.region,
}

DISCLOSURE_POLICY: Mapping[BusinessType, tuple[str, ...]] = {
    BusinessType.TRANSIT: ("card_pseudonym",),
    BusinessType.PARK: ("card_pseudonym",),
    BusinessType.LIBRARY: ("card_pseudonym",),
    BusinessType.HOSPITAL: ("card_pseudonym", "card_region"),
    BusinessType.HRSS_OFFICE: ("card_pseudonym", "card_region"),
    BusinessType.OTHER: (),
}


def disclose(claims: Claims, terminal: TerminalEntry, pseudonym_key: bytes) -> dict[str, str]:
    """The claims the terminal's business type may see, and nothing else."""
    names = DISCLOSURE_POLICY.get(BusinessType(terminal.business_type), ())
    return {name: CLAIM_SOURCES[name](claims, terminal, pseudonym_key) for name in names}
