"""The eCard credential: a CWT (RFC 8392) in COSE_Sign1 (RFC 9052, EdDSA), Base45 behind a prefix.

Layout, chosen to fit QR version 8 at error-correction level M (≤ 221 alphanumeric
characters, so ≤ 144 bytes before Base45 with the 4-character prefix):

    EC1:<base45( tag18 [ bstr{1: -8, 4: kid}, {}, bstr(claims), signature ] )>

    claims = {
        1: "510000",                    iss: issuing region (GB/T 2260 code)
        4: exp, 5: nbf,                 validity window, seconds since the epoch
        7: nonce (12 bytes),            cti: makes the credential single-use
        -65537: [card_ref (16 bytes), purpose]   private use: opaque card reference and purpose
    }

No personal data: the card reference is random and meaningful only to the issuer.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import cbor2

from crypto.base45 import b45decode, b45encode
from crypto.keys import KID_LENGTH, SigningKey, VerifyKey

PREFIX = "EC1:"
MAX_TEXT_LENGTH = 512
CARD_REF_LENGTH = 16
NONCE_LENGTH = 12

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
ALG_EDDSA = -8
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


_PURPOSE_VALUES = frozenset(int(purpose) for purpose in Purpose)


class Rejection(StrEnum):
    """Why a credential fails on its own, before any card status or nonce is consulted."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"


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
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class VerifiedCredential:
    """A credential whose signature and validity window have been checked."""

    claims: Claims
    key: VerifyKey


def _protected_header(kid: bytes) -> bytes:
    return cbor2.dumps({HEADER_ALG: ALG_EDDSA, HEADER_KID: kid})


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def encode_claims(claims: Claims) -> bytes:
    """CBOR-encode claims as the CWT payload."""
    return cbor2.dumps(
        {
            CLAIM_ISS: claims.region,
            CLAIM_EXP: claims.expires_at,
            CLAIM_NBF: claims.not_before,
            CLAIM_CTI: claims.nonce,
            CLAIM_CARD: [claims.card_ref, int(claims.purpose)],
        }
    )


def sign_cose(key: SigningKey, payload: bytes) -> bytes:
    """A tagged COSE_Sign1 over payload, kid in the protected header."""
    protected = _protected_header(key.kid)
    signature = key.sign(_sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def issue_credential(key: SigningKey, claims: Claims) -> str:
    """Sign claims and return the credential text to put in a QR code."""
    return PREFIX + b45encode(sign_cose(key, encode_claims(claims)))


def _loads_exact(data: bytes) -> object:
    """Decode one CBOR item and refuse trailing bytes.

    The input is not authenticated yet, and cbor2's decoders for semantic tags (dates,
    decimals, regexes…) raise TypeError, OverflowError or decimal errors on hostile values:
    every failure becomes a ValueError, so it ends as `malformed`, never as a crash.
    """
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if stream.tell() != len(data):
        raise ValueError("trailing bytes after the CBOR item")
    return item


def _malformed(detail: str) -> CredentialRejected:
    return CredentialRejected(Rejection.MALFORMED, detail)


def parse_cose(text: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Split credential text into (protected, payload, signature, kid), checking only structure."""
    if not isinstance(text, str) or len(text) > MAX_TEXT_LENGTH:
        raise _malformed("credential text is missing or too long")
    if not text.startswith(PREFIX):
        raise _malformed(f"credential text must start with {PREFIX!r}")
    try:
        raw = b45decode(text[len(PREFIX) :])
        message = _loads_exact(raw)
    except ValueError as exc:  # Base45Error and every CBOR failure are ValueErrors
        raise _malformed(f"credential is not Base45-encoded CBOR: {exc}") from None
    if not isinstance(message, cbor2.CBORTag) or message.tag != COSE_SIGN1_TAG:
        raise _malformed("credential is not a tagged COSE_Sign1")
    parts = message.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise _malformed("COSE_Sign1 must be an array of four items")
    protected, unprotected, payload, signature = parts
    if not (
        isinstance(protected, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
    ):
        raise _malformed("COSE_Sign1 items have the wrong types")
    try:
        header = _loads_exact(protected)
    except ValueError:
        raise _malformed("protected header is not CBOR") from None
    if not isinstance(header, dict) or header.get(HEADER_ALG) != ALG_EDDSA:
        raise _malformed("protected header must name alg EdDSA (-8)")
    kid = header.get(HEADER_KID)
    if not isinstance(kid, bytes) or len(kid) != KID_LENGTH:
        raise _malformed("protected header must carry an 8-byte kid")
    return protected, payload, signature, kid


def decode_claims(payload: bytes) -> Claims:
    """Decode and type-check the CWT claims; raise a `malformed` rejection otherwise."""
    try:
        claims = _loads_exact(payload)
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
        raise _malformed("cti must be a 12-byte nonce")
    if not (isinstance(card, list) and len(card) == 2):
        raise _malformed("card claim must be [card_ref, purpose]")
    card_ref, purpose = card
    if not (isinstance(card_ref, bytes) and len(card_ref) == CARD_REF_LENGTH):
        raise _malformed("card reference must be 16 bytes")
    if type(purpose) is not int or purpose not in _PURPOSE_VALUES:
        raise _malformed("unknown purpose")
    purpose_value = Purpose(purpose)
    return Claims(
        card_ref=card_ref,
        nonce=nonce,
        region=region,
        purpose=purpose_value,
        not_before=nbf,
        expires_at=exp,
    )


def open_credential(text: str, keys: Mapping[bytes, VerifyKey]) -> VerifiedCredential:
    """Check a credential's structure, key and signature, but not its validity window."""
    protected, payload, signature, kid = parse_cose(text)
    key = keys.get(kid)
    if key is None:
        raise CredentialRejected(Rejection.UNKNOWN_KEY, "no published key has this kid")
    if not key.verify(signature, _sig_structure(protected, payload)):
        raise CredentialRejected(Rejection.BAD_SIGNATURE, "signature does not verify")
    claims = decode_claims(payload)
    if claims.region != key.region:
        raise CredentialRejected(Rejection.BAD_SIGNATURE, "key does not sign for the credential's region")
    return VerifiedCredential(claims=claims, key=key)


def verify_credential(text: str, keys: Mapping[bytes, VerifyKey], now: int, leeway: int) -> VerifiedCredential:
    """Check a credential's structure, key, signature and validity window.

    `keys` maps kid → public key. `leeway` is the clock-skew allowance in seconds on both
    ends of the window. What remains for the caller: single use (the nonce), the card's
    status, and whether the purpose and region suit the verifier.
    """
    verified = open_credential(text, keys)
    if now > verified.claims.expires_at + leeway:
        raise CredentialRejected(Rejection.EXPIRED, "credential has expired")
    if now + leeway < verified.claims.not_before:
        raise CredentialRejected(Rejection.NOT_YET_VALID, "credential is not valid yet")
    return verified
