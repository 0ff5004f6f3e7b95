"""The eCard credential: a CWT (RFC 8392) in COSE_Sign1 (RFC 9052, EdDSA), Base45 behind a prefix.

Layout, chosen to fit QR version 8 at error-correction level M (≤ 221 alphanumeric
characters, so ≤ 144 bytes before Base45 with the 4-character prefix):

    EC1:<base45( tag18 [ bstr{1: -8, 4: kid}, {}, bstr(claims), signature ] )>

    claims = {
        1: "510000",                    iss: issuing region (GB/T 2260 code)
        4: exp, 5: nbf,                 validity window, seconds since the epoch
        7: nonce (7 bytes),             cti: makes the credential single-use
        -65537: [card_ref (16 bytes), purpose, status_index]
                                        private use: opaque card reference, purpose, and the
                                        card's index in its region's status list (0 ≤ i < 2**32)
    }

The largest credential (every value at its longest, status_index 2**32 - 1) is exactly 144
bytes. The nonce has 7 bytes (56 bits): it only needs to be unique among one card's
credentials alive at the same time, since the nonce store keys it by card and keeps it for
the credential's lifetime. A card has a bundle's worth (tens) of those, so a collision is
vanishingly rare, and it would cost one refused scan, never an accepted forgery.

The header is exact: the protected header is byte for byte {1: -8, 4: kid} as `sign1` encodes
it, and the unprotected header is empty. Anything else — `crit`, any other label, alg as text,
a kid (or anything) in the unprotected header, duplicate keys, a non-canonical length — is
`malformed` (crypto/cose.py says why), online and offline alike.

The window has a bounded length, checked in one place (`check_window`, used by the server and
by offline verification), with `lifetime` the configured credential lifetime (60 s by default)
and `leeway` the clock-skew allowance (5 s):

    exp - nbf > lifetime + leeway       lifetime_exceeded  (signed by a valid key, but not as we issue)
    now > exp + leeway                  expired
    now + leeway < nbf                  not_yet_valid

So nbf is never far in the past either: a code whose nbf is more than lifetime + leeway
before now has its exp in the past already (first rule), and is expired once the leeway on
exp is spent too; nothing is accepted more than lifetime + 2 * leeway after its nbf.
`usable_until` is the last second a code can be accepted, which is how long its nonce must be
remembered: at most lifetime + 3 * leeway past the moment of a scan, however far its exp.

The status index lets a gate that works offline look the card up in the region's signed
Token Status List (crypto/status_list.py, crypto/offline.py).

No personal data: the card reference is random and meaningful only to the issuer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal, get_args

import cbor2

from crypto.base45 import b45decode, b45encode
from crypto.cose import CoseError, Sign1, decode_sign1, loads_exact, sign1
from crypto.keys import PrivateKey, PublicKey

PREFIX = "EC1:"
MAX_TEXT_LENGTH = 512
CARD_REF_LENGTH = 16
NONCE_LENGTH = 7
STATUS_INDEX_LIMIT = 2**32
# The service's defaults (Settings.credential_lifetime, Settings.clock_skew), for offline use.
DEFAULT_LIFETIME = 60
DEFAULT_LEEWAY = 5

CLAIM_ISS = 1
CLAIM_EXP = 4
CLAIM_NBF = 5
CLAIM_CTI = 7
CLAIM_CARD = -65537


class Purpose(IntEnum):
    """What a credential may be used for; the integer is what the credential carries."""

    TRANSIT = 1
    MEDICAL = 2
    PARK = 3
    LIBRARY = 4
    GENERAL = 5

    @property
    def label(self) -> str:
        """The lower-case name used on the API."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Purpose:
        """Look a purpose up by its API name."""
        return cls[label.upper()]


# The purposes' API names, as a type wire models are checked and documented with (one list, checked here).
PurposeName = Literal["transit", "medical", "park", "library", "general"]
assert set(get_args(PurposeName)) == {purpose.label for purpose in Purpose}

_PURPOSE_VALUES = frozenset(int(purpose) for purpose in Purpose)


class Rejection(StrEnum):
    """Why a credential fails on its own, before any card status or nonce is consulted."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    # Signed by a valid key, but valid for longer than any code is issued for (exp - nbf).
    LIFETIME_EXCEEDED = "lifetime_exceeded"


class CredentialRejected(Exception):
    """The credential is not acceptable; `reason` says why in a stable code."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Claims:
    """What a credential says."""

    card_ref: bytes
    nonce: bytes
    region: str
    purpose: Purpose
    status_index: int
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class VerifiedCredential:
    """A credential whose signature and validity window have been checked."""

    claims: Claims
    key: PublicKey


def encode_claims(claims: Claims) -> bytes:
    """CBOR-encode claims as the CWT payload."""
    return cbor2.dumps(
        {
            CLAIM_ISS: claims.region,
            CLAIM_EXP: claims.expires_at,
            CLAIM_NBF: claims.not_before,
            CLAIM_CTI: claims.nonce,
            CLAIM_CARD: [claims.card_ref, int(claims.purpose), claims.status_index],
        }
    )


def issue_credential(key: PrivateKey, claims: Claims) -> str:
    """Sign claims and return the credential text to put in a QR code."""
    return PREFIX + b45encode(sign1(key, encode_claims(claims)))


def _malformed(detail: str) -> CredentialRejected:
    return CredentialRejected(Rejection.MALFORMED, detail)


def parse_sign1(text: str) -> Sign1:
    """The credential text's COSE_Sign1, checking only structure."""
    if not isinstance(text, str) or len(text) > MAX_TEXT_LENGTH:
        raise _malformed("credential text is missing or too long")
    if not text.startswith(PREFIX):
        raise _malformed(f"credential text must start with {PREFIX!r}")
    try:
        message = loads_exact(b45decode(text[len(PREFIX) :]))
    except ValueError as exc:  # Base45Error and every CBOR failure are ValueErrors
        raise _malformed(f"credential is not Base45-encoded CBOR: {exc}") from None
    try:
        return decode_sign1(message)
    except CoseError as exc:
        raise _malformed(f"credential: {exc}") from None


def parse_cose(text: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Split credential text into (protected, payload, signature, kid), checking only structure."""
    parts = parse_sign1(text)
    return parts.protected, parts.payload, parts.signature, parts.kid


def decode_claims(payload: bytes) -> Claims:
    """Decode and type-check the CWT claims; raise a `malformed` rejection otherwise."""
    try:
        claims = loads_exact(payload)
    except ValueError:
        raise _malformed("payload is not CBOR") from None
    # Exact int keys only: True and 1.0 compare equal to 1 and must not pass for it.
    if not isinstance(claims, dict) or not all(type(key) is int for key in claims):
        raise _malformed("payload is not a claims map with integer keys")
    region = claims.get(CLAIM_ISS)
    exp = claims.get(CLAIM_EXP)
    nbf = claims.get(CLAIM_NBF)
    nonce = claims.get(CLAIM_CTI)
    card = claims.get(CLAIM_CARD)
    if not (isinstance(region, str) and len(region) == 6 and region.isascii() and region.isdigit()):
        raise _malformed("iss must be a 6-digit region code")
    if type(exp) is not int or type(nbf) is not int or not 0 <= nbf <= exp < 2**32:
        raise _malformed("nbf and exp must be integers with nbf <= exp")
    if not (isinstance(nonce, bytes) and len(nonce) == NONCE_LENGTH):
        raise _malformed(f"cti must be a {NONCE_LENGTH}-byte nonce")
    if not (isinstance(card, list) and len(card) == 3):
        raise _malformed("card claim must be [card_ref, purpose, status_index]")
    card_ref, purpose, status_index = card
    if not (isinstance(card_ref, bytes) and len(card_ref) == CARD_REF_LENGTH):
        raise _malformed("card reference must be 16 bytes")
    if type(purpose) is not int or purpose not in _PURPOSE_VALUES:
        raise _malformed("unknown purpose")
    if type(status_index) is not int or not 0 <= status_index < STATUS_INDEX_LIMIT:
        raise _malformed("status index must be an integer in [0, 2**32)")
    return Claims(
        card_ref=card_ref,
        nonce=nonce,
        region=region,
        purpose=Purpose(purpose),
        status_index=status_index,
        not_before=nbf,
        expires_at=exp,
    )


def open_credential(text: str, keys: Mapping[bytes, PublicKey]) -> VerifiedCredential:
    """Check a credential's structure, key and signature, but not its validity window.

    The kid's key decides the algorithm: a header naming another one than the key's is refused
    as bad_signature before any signature check.
    """
    parts = parse_sign1(text)
    key = keys.get(parts.kid)
    if key is None:
        raise CredentialRejected(Rejection.UNKNOWN_KEY, "no published key has this kid")
    if key.alg != parts.alg:
        raise CredentialRejected(Rejection.BAD_SIGNATURE, "the header's algorithm is not the kid's key's")
    if not parts.verifies_with(key):
        raise CredentialRejected(Rejection.BAD_SIGNATURE, "signature does not verify")
    claims = decode_claims(parts.payload)
    if claims.region != key.region:
        raise CredentialRejected(Rejection.BAD_SIGNATURE, "key does not sign for the credential's region")
    return VerifiedCredential(claims=claims, key=key)


def check_window(claims: Claims, now: int, leeway: int, lifetime: int = DEFAULT_LIFETIME) -> None:
    """Refuse a window longer than lifetime + leeway, then a `now` outside [nbf - leeway, exp + leeway].

    The one place the validity window is decided, for the server and for offline gates alike
    (see the module docstring for what the rules imply).
    """
    span = claims.expires_at - claims.not_before
    if span > lifetime + leeway:
        raise CredentialRejected(
            Rejection.LIFETIME_EXCEEDED,
            f"credential is valid for {span} s, more than the {lifetime} s lifetime plus {leeway} s of skew",
        )
    if now > claims.expires_at + leeway:
        raise CredentialRejected(Rejection.EXPIRED, "credential has expired")
    if now + leeway < claims.not_before:
        raise CredentialRejected(Rejection.NOT_YET_VALID, "credential is not valid yet")


def usable_until(claims: Claims, leeway: int, lifetime: int = DEFAULT_LIFETIME) -> int:
    """The last second at which `check_window` can accept the credential: what its nonce must outlive.

    Taken from min(exp, nbf + lifetime + leeway), never from a far exp alone, so a code that
    slipped past the lifetime rule still could not make a nonce outlive the bound.
    """
    return min(claims.expires_at, claims.not_before + lifetime + leeway) + leeway


def verify_credential(
    text: str, keys: Mapping[bytes, PublicKey], now: int, leeway: int, lifetime: int = DEFAULT_LIFETIME
) -> VerifiedCredential:
    """Check a credential's structure, key, signature and validity window.

    `keys` maps kid → public key. `leeway` is the clock-skew allowance in seconds on both
    ends of the window, `lifetime` the longest window a code is issued with (`check_window`).
    What remains for the caller: single use (the nonce), the card's status, and whether the
    purpose and region suit the verifier.
    """
    verified = open_credential(text, keys)
    check_window(verified.claims, now, leeway, lifetime)
    return verified
