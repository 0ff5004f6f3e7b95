"""The eCard credential: a CWT (RFC 8392) in COSE_Sign1 (RFC 9052, EdDSA), Base45 behind a prefix.

Layout, chosen to fit QR version 8 at error-correction level M (≤ 221 alphanumeric
characters, so ≤ 144 bytes before Base45 with the 4-character prefix):

    EC1:<base45( tag18 [ bstr{1: -8, 4: kid}, {}, bstr(claims), signature ] )>

    claims = {
        1: "510000",                    iss: issuing region (GB/T 2260 code)
        4: exp, 5: nbf,                 validity window, seconds since the epoch
        7: nonce (7 bytes),             cti: makes the credential single-use
        -65537: [sealed_ref (16 bytes), purpose]
                                        private use: the card reference sealed for this code
                                        (crypto/seal.py), and the purpose
    }

The largest credential (every value at its longest) is 139 bytes with an Ed25519 key, 143
with an SM2 key (its private-use alg takes 4 more): 213 and 219 characters with the prefix,
QR version 8-M (version 7-M holds 178). The nonce has 7 bytes (56 bits): it only needs to be
unique among one card's credentials alive at the same time, since the nonce store keys it by
card and keeps it for the credential's lifetime. A card has a bundle's worth (tens) of those, so a collision is
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

Unlinkable: no value in a code is common to two codes of one card but iss, kid, alg, purpose
and the times. The nonce is random per code, the signature covers a different payload, and the
card reference is sealed per code under a key of the issuer's (crypto/seal.py): a gate, or
anyone who photographs codes, can check a code with the published keys (`verify_credential`,
`CodeClaims`) but cannot tell whose it is; only the issuer's verify path, which holds the seals,
resolves it to its card (`open_credential`, `Claims`). Codes carry no status-list index either
(a stable index is a stable identifier): README's "Offline gates" says what gates do instead.

No personal data: the card reference is random and meaningful only to the issuer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal, Protocol, get_args

import cbor2

from crypto import algorithms
from crypto.base45 import b45decode, b45encode
from crypto.cose import CoseError, Sign1, decode_sign1, loads_exact, sign1
from crypto.keys import PrivateKey, PublicKey
from crypto.seal import SEALED_LENGTH, CardRefSeal

PREFIX = "EC1:"
MAX_TEXT_LENGTH = 512
CARD_REF_LENGTH = 16
NONCE_LENGTH = 7
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
    """What the issuer puts in a credential: the card reference in clear, sealed when it is signed."""

    card_ref: bytes
    nonce: bytes
    region: str
    purpose: Purpose
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class CodeClaims:
    """What a credential says to anyone holding the published keys: its card reference only sealed."""

    sealed_ref: bytes
    nonce: bytes
    region: str
    purpose: Purpose
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class VerifiedCode:
    """A credential whose signature (and, from `verify_credential`, validity window) has been checked."""

    claims: CodeClaims
    key: PublicKey


@dataclass(frozen=True, slots=True)
class VerifiedCredential:
    """A credential whose signature has been checked and whose card reference the issuer has unsealed."""

    claims: Claims
    key: PublicKey


class _Window(Protocol):
    @property
    def not_before(self) -> int: ...

    @property
    def expires_at(self) -> int: ...


_SEALS: dict[tuple[bytes, str], CardRefSeal] = {}


def seal_for(key: PrivateKey, region: str) -> CardRefSeal:
    """The card-reference seal of a software signing key for its region, derived from its secret (once per
    process and key). The service passes the issuer's seal instead (`IssuerKeys.seals`), which is what a
    key held in a module, having no secret to give, needs."""
    seal = _SEALS.get((key.kid, region))
    if seal is None:
        if len(_SEALS) >= 1024:
            _SEALS.clear()
        seal = CardRefSeal.derive(algorithms.secret_of(key), algorithms.name_of(key), region, key.kid)
        _SEALS[(key.kid, region)] = seal
    return seal


def encode_claims(claims: Claims, seal: CardRefSeal) -> bytes:
    """CBOR-encode claims as the CWT payload, the card reference sealed for this code."""
    sealed = seal.seal(claims.card_ref, claims.nonce, claims.not_before)
    return cbor2.dumps(
        {
            CLAIM_ISS: claims.region,
            CLAIM_EXP: claims.expires_at,
            CLAIM_NBF: claims.not_before,
            CLAIM_CTI: claims.nonce,
            CLAIM_CARD: [sealed, int(claims.purpose)],
        }
    )


def issue_credential(key: PrivateKey, claims: Claims, seal: CardRefSeal | None = None) -> str:
    """Sign claims and return the credential text to put in a QR code.

    The card reference is sealed with `seal`, by default the key's own (`seal_for`), which is the
    one the issuer's verify path opens it with.
    """
    if seal is None:
        seal = seal_for(key, claims.region)
    return PREFIX + b45encode(sign1(key, encode_claims(claims, seal)))


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


def decode_claims(payload: bytes) -> CodeClaims:
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
    if not (isinstance(card, list) and len(card) == 2):
        raise _malformed("card claim must be [sealed_ref, purpose]")
    sealed_ref, purpose = card
    if not (isinstance(sealed_ref, bytes) and len(sealed_ref) == SEALED_LENGTH):
        raise _malformed("sealed card reference must be 16 bytes")
    if type(purpose) is not int or purpose not in _PURPOSE_VALUES:
        raise _malformed("unknown purpose")
    return CodeClaims(
        sealed_ref=sealed_ref,
        nonce=nonce,
        region=region,
        purpose=Purpose(purpose),
        not_before=nbf,
        expires_at=exp,
    )


def open_code(text: str, keys: Mapping[bytes, PublicKey]) -> VerifiedCode:
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
    return VerifiedCode(claims=claims, key=key)


def unseal(code: VerifiedCode, seals: Mapping[bytes, CardRefSeal]) -> VerifiedCredential:
    """The issuer's view of a verified code: its card reference opened with the kid's seal."""
    seal = seals.get(code.key.kid)
    if seal is None:
        raise CredentialRejected(Rejection.UNKNOWN_KEY, "the issuer holds no seal for this kid")
    claims = code.claims
    return VerifiedCredential(
        claims=Claims(
            card_ref=seal.open(claims.sealed_ref, claims.nonce, claims.not_before),
            nonce=claims.nonce,
            region=claims.region,
            purpose=claims.purpose,
            not_before=claims.not_before,
            expires_at=claims.expires_at,
        ),
        key=code.key,
    )


def open_credential(
    text: str, keys: Mapping[bytes, PublicKey], seals: Mapping[bytes, CardRefSeal]
) -> VerifiedCredential:
    """The issuer's check of a credential: structure, key and signature (`open_code`), then its card
    reference unsealed; not its validity window."""
    return unseal(open_code(text, keys), seals)


def check_window(claims: _Window, now: int, leeway: int, lifetime: int = DEFAULT_LIFETIME) -> None:
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


def usable_until(claims: _Window, leeway: int, lifetime: int = DEFAULT_LIFETIME) -> int:
    """The last second at which `check_window` can accept the credential: what its nonce must outlive.

    Taken from min(exp, nbf + lifetime + leeway), never from a far exp alone, so a code that
    slipped past the lifetime rule still could not make a nonce outlive the bound.
    """
    return min(claims.expires_at, claims.not_before + lifetime + leeway) + leeway


def verify_credential(
    text: str, keys: Mapping[bytes, PublicKey], now: int, leeway: int, lifetime: int = DEFAULT_LIFETIME
) -> VerifiedCode:
    """Check a credential's structure, key, signature and validity window.

    `keys` maps kid → public key. `leeway` is the clock-skew allowance in seconds on both
    ends of the window, `lifetime` the longest window a code is issued with (`check_window`).
    This is what a gate can check with the published keys alone: the card reference stays sealed
    (`CodeClaims`). What remains for the caller: single use (the nonce), and whether the purpose
    and region suit the verifier; the card and its status only the issuer can resolve.
    """
    verified = open_code(text, keys)
    check_window(verified.claims, now, leeway, lifetime)
    return verified
