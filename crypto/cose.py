"""COSE_Sign1 (RFC 9052) with EdDSA or SM2, as both signed objects here use it.

The QR credential and the status list token are each a tagged COSE_Sign1 (tag 18) whose
protected header names the signer key's algorithm — EdDSA (-8), or SM2 with SM3 (-65538, private
use: crypto/keys.py) — and its 8-byte kid, with an empty unprotected header and an attached
payload. This module signs such messages and checks their structure; what the payload means,
and which error a caller reports, is left to the two callers.

The algorithm is the key's, not the message's: `Sign1.verifies_with` refuses a key of another
algorithm than the header names (no algorithm confusion: a kid bound to an Ed25519 key never
verifies an SM2 signature, nor the reverse).

The header is exact, not merely sufficient. The protected header is precisely the bytes
`protected_header` makes for the message's kid and alg (and the caller's typ): {1: alg, 4: kid},
or {1: alg, 4: kid, 16: typ} for a typed token, canonical CBOR in that order. So a header with
any other label — `crit` (2) above all, which RFC 9052 §3.1 says a recipient that does not
understand the named headers must reject, but also content type, iv, x5chain, a typ where
none belongs, label 99 — or with alg as text, duplicate keys, or a longer encoding of a
length, is refused, as is any entry in the unprotected header (it is not signed: a kid or
alg there could only mislead). The check needs no knowledge of other headers: nothing but
these exact bytes passes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cbor2

from crypto.keys import ALG_EDDSA, ALGORITHM_NAMES, KID_LENGTH, PrivateKey, PublicKey

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
HEADER_TYP = 16  # RFC 9596


class CoseError(ValueError):
    """The bytes are not a COSE_Sign1 of this profile; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Sign1:
    """The parts of a structurally sound COSE_Sign1, its signature not yet checked."""

    protected: bytes
    header: dict[Any, Any]
    payload: bytes
    signature: bytes
    kid: bytes
    alg: int = ALG_EDDSA

    def verifies_with(self, key: PublicKey) -> bool:
        """True when the key is of the header's algorithm and the signature is its signature over the
        protected header and payload."""
        return key.alg == self.alg and key.verify(self.signature, sig_structure(self.protected, self.payload))


def loads_exact(data: bytes) -> object:
    """Decode one CBOR item and refuse trailing bytes.

    The input is not authenticated yet, and cbor2's decoders for semantic tags (dates,
    decimals, regexes…) raise TypeError, OverflowError or decimal errors on hostile values:
    every failure becomes a ValueError, so callers can report it as malformed, never crash.
    """
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if stream.tell() != len(data):
        raise ValueError("trailing bytes after the CBOR item")
    return item


# The start of every Sig_structure: an array of four, the text "Signature1".
_SIG_STRUCTURE_HEAD = cbor2.dumps(["Signature1", b"", b"", b""])[:12]


def _bstr_head(length: int) -> bytes:
    """The CBOR head of a byte string of this length (major type 2)."""
    if length < 24:
        return bytes((0x40 | length,))
    if length < 0x100:
        return bytes((0x58, length))
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big")
    return b"\x5a" + length.to_bytes(4, "big")


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 Sig_structure for COSE_Sign1, with empty external_aad.

    Written out rather than built by cbor2 (a fifth of the time): it is made on every scan.
    """
    return b"".join(
        (_SIG_STRUCTURE_HEAD, _bstr_head(len(protected)), protected, b"\x40", _bstr_head(len(payload)), payload)
    )


# cbor2's encoding of {1: alg, 4: <8-byte kid>} up to the kid, per algorithm: the credential's header
# is this plus the kid, built without cbor2 because every scan compares against it.
_KID_HEADER_HEADS = {
    alg: cbor2.dumps({HEADER_ALG: alg, HEADER_KID: b"\0" * KID_LENGTH})[:-KID_LENGTH] for alg in ALGORITHM_NAMES
}


def protected_header(kid: bytes, typ: str | None = None, alg: int = ALG_EDDSA) -> bytes:
    """{1: alg, 4: kid}, and {16: typ} after them when a type is given: the only header this profile accepts."""
    if typ is None and len(kid) == KID_LENGTH and alg in _KID_HEADER_HEADS:
        return _KID_HEADER_HEADS[alg] + kid
    header: dict[int, object] = {HEADER_ALG: alg, HEADER_KID: kid}
    if typ is not None:
        header[HEADER_TYP] = typ
    return cbor2.dumps(header)


def sign1(key: PrivateKey, payload: bytes, typ: str | None = None) -> bytes:
    """A tagged COSE_Sign1 over payload: the key's alg, its kid (and typ) protected, unprotected header empty."""
    protected = protected_header(key.kid, typ, key.alg)
    signature = key.sign(sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


# Names of the registered labels a hand-made header is most likely to carry, for the error message.
_LABEL_NAMES = {2: "crit", 3: "content type", 5: "iv", 6: "partial iv", 16: "typ", 33: "x5chain"}


def _describe_labels(labels: Iterable[object]) -> str:
    """Up to five labels, each shortened and named where registered: the untrusted input stays small in messages."""
    shown = []
    for label in list(labels)[:5]:
        text = repr(label)[:24]
        shown.append(f"{text} ({_LABEL_NAMES[label]})" if type(label) is int and label in _LABEL_NAMES else text)
    return ", ".join(shown)


def _header_fault(header: dict[Any, Any], typ: str | None) -> str:
    """Why a protected header with alg and kid is still not the exact one: the most telling fault first."""
    allowed = (HEADER_ALG, HEADER_KID) if typ is None else (HEADER_ALG, HEADER_KID, HEADER_TYP)
    # Compared by type too: True and 1.0 are equal to 1 in Python, but not the same CBOR label.
    extra = [label for label in header if type(label) is not int or label not in allowed]
    if extra:
        return f"protected header carries label {_describe_labels(extra)}, which this profile does not allow"
    if typ is not None and header.get(HEADER_TYP) != typ:
        return f"protected header must carry typ {typ!r}"
    return "protected header is not in this profile's canonical encoding (key order, duplicate keys or lengths)"


def decode_sign1(message: object, typ: str | None = None) -> Sign1:
    """Check that a decoded CBOR item is a tagged COSE_Sign1 of this profile; raise CoseError.

    Its protected header must be exactly `protected_header(kid, typ, alg)` for one of this
    profile's algorithms, and its unprotected header empty (see the module docstring); the
    signature (and whether the kid's key is of that algorithm) is not checked here.
    """
    if not isinstance(message, cbor2.CBORTag) or message.tag != COSE_SIGN1_TAG:
        raise CoseError("not a tagged COSE_Sign1 (CBOR tag 18)")
    parts = message.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise CoseError("COSE_Sign1 must be an array of four items")
    protected, unprotected, payload, signature = parts
    if not (
        isinstance(protected, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
    ):
        raise CoseError("COSE_Sign1 items have the wrong types")
    try:
        header = loads_exact(protected)
    except ValueError:
        raise CoseError("protected header is not CBOR") from None
    alg = header.get(HEADER_ALG) if isinstance(header, dict) else None
    # A -8.0 passes here (it equals -8): the exact bytes below refuse it, with the more telling message.
    if not isinstance(header, dict) or not isinstance(alg, int | float) or alg not in ALGORITHM_NAMES:
        raise CoseError("protected header must name alg EdDSA (-8) or SM2 with SM3 (-65538)")
    kid = header.get(HEADER_KID)
    if not isinstance(kid, bytes) or len(kid) != KID_LENGTH:
        raise CoseError("protected header must carry an 8-byte kid")
    if protected != protected_header(kid, typ, int(alg)):
        raise CoseError(_header_fault(header, typ))
    if unprotected:
        raise CoseError(f"unprotected header must be empty; it carries label {_describe_labels(unprotected)}")
    return Sign1(protected=protected, header=header, payload=payload, signature=signature, kid=kid, alg=int(alg))
