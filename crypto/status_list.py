"""Token Status List (draft-ietf-oauth-status-list), CWT form: every card's status, signed per region.

Gates that work offline carry their region's list and look a card up by the `status_index`
its credential carries. The token is a tagged COSE_Sign1 signed with the region's key:

    tag18 [ bstr{1: -8, 4: kid, 16: "application/statuslist+cwt"}, {}, bstr(claims), signature ]

    claims = {
        1: "510000",            iss: the region whose cards the list covers; must be the key's region
        2: "https://…",         sub: the URI the list is published at
        6: iat, 4: exp,         issued at; expiry, after which the list is stale
        65534: ttl,             seconds a consumer may cache the list before fetching a new one
        65533: {"bits": 2, "lst": zlib(byte array)}   the status list
    }

The header is exact (crypto/cose.py): the protected header is precisely the canonical
{1: -8, 4: kid, 16: "application/statuslist+cwt"}, nothing else (no crit, no other label), and
the unprotected header is empty; anything else is `malformed`.

The draft asks for sub, iat and the status list, recommends exp and ttl, and lets a token
carry other claims: this profile requires exp (a gate must know when its list goes stale),
adds iss as the credential has it, and reads ttl when present. Claim keys 65533 and 65534 are
the draft's requested assignments.

Byte array: index i's status sits in byte i * bits // 8, packed from the least significant
bit up, so with 2 bits byte 0 holds indices 0 (bits 0-1) to 3 (bits 6-7). It is compressed
with DEFLATE in the ZLIB format at the highest level. A list's length is its byte count times
8 / bits; the draft has no other length, so when the number of cards is not a multiple of 8 /
bits, the spare slots of the last byte are filled with `padding`, by default PENDING_ACTIVATION
rather than VALID: a card given its index after the list was signed must not pass as valid.

Opening a token checks structure, key, region and signature, and decompresses at most
MAX_LIST_BYTES (64 MiB: 268 million cards at 2 bits) so a zlib bomb cannot exhaust memory.
Whether the list is stale is left to the caller (`VerifiedStatusList.is_stale`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import TypeGuard

import cbor2

from crypto.cose import CoseError, decode_sign1, loads_exact, sign1
from crypto.credential import Rejection
from crypto.keys import PrivateKey, PublicKey

TYP = "application/statuslist+cwt"
STATUS_BITS = 2
ALLOWED_BITS = frozenset({1, 2, 4, 8})
MAX_LIST_BYTES = 64 * 1024 * 1024
MAX_TOKEN_BYTES = 16 * 1024 * 1024
MAX_SUBJECT_LENGTH = 2048
TIME_LIMIT = 2**32

CLAIM_ISS = 1
CLAIM_SUB = 2
CLAIM_EXP = 4
CLAIM_IAT = 6
CLAIM_TTL = 65534
CLAIM_STATUS_LIST = 65533


class CardStatusCode(IntEnum):
    """A card's status as the list carries it (the draft's Status Types)."""

    VALID = 0
    INVALID = 1  # revoked for good
    SUSPENDED = 2
    # 0x03 is reserved by the draft as application specific: here, not usable yet.
    PENDING_ACTIVATION = 3

    @property
    def label(self) -> str:
        """The lower-case name used in output."""
        return self.name.lower()


class StatusListRejected(Exception):
    """The status list token is not acceptable; `reason` says why, with the credential's codes."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _malformed(detail: str) -> StatusListRejected:
    return StatusListRejected(Rejection.MALFORMED, detail)


def _check_bits(bits: object) -> int:
    if type(bits) is not int or bits not in ALLOWED_BITS:
        raise ValueError("bits must be 1, 2, 4 or 8")
    return bits


@cache
def _shift_table(shift: int) -> bytes:
    """bytes.translate table: value → value << shift, within a byte."""
    return bytes((value << shift) & 0xFF for value in range(256))


@cache
def _field_table(shift: int, bits: int) -> bytes:
    """bytes.translate table: byte → its `bits`-bit field starting at bit `shift`."""
    return bytes((byte >> shift) & ((1 << bits) - 1) for byte in range(256))


def _spread(values: bytes, bits: int) -> bytes:
    """Pack one status per input byte into `bits` bits each, least significant bits first."""
    per_byte = 8 // bits
    length = -(-len(values) // per_byte)
    packed = 0
    # Slot k of every byte comes from values[k::per_byte]: shift it into place with one
    # translate, then OR the slots together as big integers; no Python loop per card.
    for slot in range(per_byte):
        lane = values[slot::per_byte].translate(_shift_table(slot * bits))
        packed |= int.from_bytes(lane.ljust(length, b"\0"), "little")
    return packed.to_bytes(length, "little")


@dataclass(frozen=True, slots=True)
class StatusList:
    """A status list: `bits` per entry, packed into `packed` (the uncompressed byte array)."""

    bits: int
    packed: bytes

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if not isinstance(self.packed, bytes):
            raise TypeError("packed must be bytes")

    def __len__(self) -> int:
        return len(self.packed) * 8 // self.bits

    def get(self, index: int) -> int:
        """The status at index; raise IndexError outside 0 <= index < len(self)."""
        if not 0 <= index < len(self):
            raise IndexError(f"status index {index} is outside the list of {len(self)}")
        bit = index * self.bits
        return (self.packed[bit // 8] >> (bit % 8)) & ((1 << self.bits) - 1)

    def statuses(self) -> bytes:
        """Every status in index order, one byte each."""
        per_byte = 8 // self.bits
        out = bytearray(len(self))
        for slot in range(per_byte):
            out[slot::per_byte] = self.packed.translate(_field_table(slot * self.bits, self.bits))
        return bytes(out)

    @classmethod
    def from_statuses(
        cls,
        statuses: Sequence[int] | Mapping[int, int],
        *,
        bits: int = STATUS_BITS,
        size: int | None = None,
        padding: int = CardStatusCode.PENDING_ACTIVATION,
    ) -> StatusList:
        """Pack statuses: a sequence (position = index), or a mapping index → status.

        With a mapping, indices below `size` (default: the largest index + 1) that it does
        not name are VALID. Slots past the last status up to the byte boundary get `padding`.
        Raise ValueError on a status or padding that does not fit in `bits`.
        """
        _check_bits(bits)
        limit = 1 << bits
        if not 0 <= padding < limit:
            raise ValueError(f"padding {padding} does not fit in {bits} bits")
        if isinstance(statuses, Mapping):
            count = size if size is not None else max(statuses, default=-1) + 1
            dense = bytearray(count)
            for index, status in statuses.items():
                if not 0 <= index < count:
                    raise ValueError(f"index {index} is outside the list of {count}")
                if not 0 <= status < limit:
                    raise ValueError(f"status {status} at index {index} does not fit in {bits} bits")
                dense[index] = status
            values = bytes(dense)
        else:
            if size is not None:
                raise ValueError("size is taken from the sequence; give it only with a mapping")
            values = bytes(statuses)  # ValueError outside 0..255
            if values and max(values) >= limit:
                raise ValueError(f"a status does not fit in {bits} bits")
        per_byte = 8 // bits
        values += bytes([padding]) * (-len(values) % per_byte)
        return cls(bits=bits, packed=_spread(values, bits))

    def compress(self) -> bytes:
        """`lst`: the byte array, DEFLATE in ZLIB format at the highest level."""
        return zlib.compress(self.packed, 9)

    @classmethod
    def decompress(cls, lst: bytes, bits: int, max_bytes: int = MAX_LIST_BYTES) -> StatusList:
        """Read `lst`; raise ValueError if it is not one whole ZLIB stream of at most max_bytes."""
        _check_bits(bits)
        inflater = zlib.decompressobj()
        try:
            packed = inflater.decompress(lst, max_bytes + 1)
        except zlib.error as exc:
            raise ValueError(f"lst is not ZLIB data: {exc}") from None
        if len(packed) > max_bytes or inflater.unconsumed_tail:
            raise ValueError(f"lst inflates to more than {max_bytes} bytes")
        if not inflater.eof:
            raise ValueError("lst is a truncated ZLIB stream")
        if inflater.unused_data:
            raise ValueError("trailing bytes after the ZLIB stream in lst")
        return cls(bits=bits, packed=packed)


@dataclass(frozen=True, slots=True)
class VerifiedStatusList:
    """A status list token whose key, region and signature have been checked."""

    subject: str
    region: str
    issued_at: int
    expires_at: int
    ttl: int | None
    status_list: StatusList
    key: PublicKey

    @property
    def kid(self) -> bytes:
        """The signing key's id."""
        return self.key.kid

    def is_stale(self, now: int, leeway: int = 0) -> bool:
        """True once now is past exp (plus the clock-skew leeway)."""
        return now > self.expires_at + leeway


def _is_region(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) == 6 and value.isascii() and value.isdigit()


def sign_status_list(
    key: PrivateKey,
    *,
    region: str,
    subject: str,
    status_list: StatusList,
    issued_at: int,
    expires_at: int,
    ttl: int,
) -> bytes:
    """The status list token (tagged COSE_Sign1 bytes) of a region, signed with its key."""
    if not _is_region(region):
        raise ValueError("region must be a 6-digit code")
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
        raise ValueError("subject must be a URI of at most 2048 characters")
    if not 0 <= issued_at <= expires_at < TIME_LIMIT:
        raise ValueError("need 0 <= issued_at <= expires_at < 2**32")
    if not 0 < ttl < TIME_LIMIT:
        raise ValueError("ttl must be a positive number of seconds")
    claims = {
        CLAIM_ISS: region,
        CLAIM_SUB: subject,
        CLAIM_IAT: issued_at,
        CLAIM_EXP: expires_at,
        CLAIM_TTL: ttl,
        CLAIM_STATUS_LIST: {"bits": status_list.bits, "lst": status_list.compress()},
    }
    return sign1(key, cbor2.dumps(claims), typ=TYP)


def _time(claims: dict[int, object], key: int, name: str) -> int:
    value = claims.get(key)
    if type(value) is not int or not 0 <= value < TIME_LIMIT:
        raise _malformed(f"{name} must be an integer time in [0, 2**32)")
    return value


def open_status_list(
    token: bytes, keys: Mapping[bytes, PublicKey], *, max_list_bytes: int = MAX_LIST_BYTES
) -> VerifiedStatusList:
    """Check a status list token's structure, key, signature and region, and decompress its list.

    `keys` maps kid → public key; the key must sign for the region the token names (iss).
    Raise StatusListRejected (malformed, unknown_key or bad_signature) on anything else; the
    expiry is not checked here.
    """
    if not isinstance(token, bytes) or len(token) > MAX_TOKEN_BYTES:
        raise _malformed("status list token is missing or too long")
    try:
        message = decode_sign1(loads_exact(token), typ=TYP)
    except CoseError as exc:
        raise _malformed(f"status list token: {exc}") from None
    except ValueError as exc:
        raise _malformed(f"status list token is not CBOR: {exc}") from None
    key = keys.get(message.kid)
    if key is None:
        raise StatusListRejected(Rejection.UNKNOWN_KEY, "no published key has this kid")
    if not message.verifies_with(key):
        raise StatusListRejected(Rejection.BAD_SIGNATURE, "signature does not verify")

    try:
        claims = loads_exact(message.payload)
    except ValueError:
        raise _malformed("payload is not CBOR") from None
    if not isinstance(claims, dict) or not all(type(claim) is int for claim in claims):
        raise _malformed("payload is not a claims map with integer keys")
    region = claims.get(CLAIM_ISS)
    if not _is_region(region):
        raise _malformed("iss must be a 6-digit region code")
    if region != key.region:
        raise StatusListRejected(Rejection.BAD_SIGNATURE, "key does not sign for the list's region")
    subject = claims.get(CLAIM_SUB)
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
        raise _malformed("sub must be the list's URI")
    issued_at = _time(claims, CLAIM_IAT, "iat")
    expires_at = _time(claims, CLAIM_EXP, "exp")
    if expires_at < issued_at:
        raise _malformed("exp is before iat")
    ttl = claims.get(CLAIM_TTL)
    if ttl is not None and (type(ttl) is not int or not 0 < ttl < TIME_LIMIT):
        raise _malformed("ttl must be a positive integer")

    status_list = claims.get(CLAIM_STATUS_LIST)
    if not isinstance(status_list, dict):
        raise _malformed("status_list claim must be a map")
    bits = status_list.get("bits")
    lst = status_list.get("lst")
    if type(bits) is not int or bits not in ALLOWED_BITS:
        raise _malformed("status_list bits must be 1, 2, 4 or 8")
    if not isinstance(lst, bytes):
        raise _malformed("status_list lst must be a byte string")
    try:
        statuses = StatusList.decompress(lst, bits, max_list_bytes)
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    return VerifiedStatusList(
        subject=subject,
        region=region,
        issued_at=issued_at,
        expires_at=expires_at,
        ttl=ttl,
        status_list=statuses,
        key=key,
    )
