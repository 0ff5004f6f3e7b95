"""Compact JWS (RFC 7515) signed by an Ed25519 ("EdDSA") or an SM2 ("SM2", private use) key.

What the trust list (crypto/trust_list.py) and, under the national profile, the API session tokens
(app/security/tokens.py) share. JOSE registers no SM2 algorithm. Like the JWK of an SM2 key
(crypto/jwk.py, `"alg": "SM2"`), the header then says `"alg": "SM2"`: an SM2 signature r ‖ s
(64 bytes, big-endian, base64url) with SM3 and the default signer ID of GM/T 0009 over the JWS
signing input, ASCII(header "." payload), exactly as RFC 7515 signs with any other algorithm.

The key decides the algorithm: `open_compact` looks the header's kid up among the keys it is given
and checks that key's algorithm against the header, so an Ed25519 key never accepts an "SM2" header,
nor the reverse, and no other algorithm is read. The caller adds its own rules on the header's other
members and on the claims.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from typing import Any

from crypto.keys import PrivateKey, PublicKey, SigningKey, VerifyKey, b64url, b64url_decode
from crypto.sm import Sm2SigningKey, Sm2VerifyKey

EDDSA = "EdDSA"
SM2 = "SM2"


class JwsRejected(ValueError):
    """The token is not a compact JWS that one of the given keys signed; the message says why."""


def algorithm_of(key: PublicKey | PrivateKey) -> str:
    """The JWS algorithm of a key: "SM2" for an SM2 key, "EdDSA" for an Ed25519 one."""
    if isinstance(key, Sm2SigningKey | Sm2VerifyKey):
        return SM2
    if isinstance(key, SigningKey | VerifyKey):
        return EDDSA
    raise TypeError(f"not an Ed25519 or SM2 key: {type(key).__name__}")


def sign_compact(key: PrivateKey, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """The claims as a compact JWS signed by key; the header's `alg` is the key's, then header's members."""
    protected = {"alg": algorithm_of(key), **header}
    signing_input = _segment(protected) + "." + _segment(dict(claims))
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


def read_header(token: str, max_length: int) -> dict[str, Any]:
    """The header of a compact JWS, unverified (to find its key); JwsRejected when it is not one."""
    return _split(token, max_length)[0]


def open_compact(token: str, keys: Mapping[str, PublicKey], max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS signed by the key its kid names among keys, with that key's
    algorithm. JwsRejected for anything else, never another exception."""
    header, header_part, payload_part, signature = _split(token, max_length)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise JwsRejected("the kid names none of the keys this token may be signed by")
    alg = algorithm_of(key)
    if header.get("alg") != alg:
        raise JwsRejected(f"the key verifies {alg}, the header says {header.get('alg')!r}")
    if not key.verify(signature, (header_part + "." + payload_part).encode("ascii")):
        raise JwsRejected("the signature does not verify under the key")
    return header, _json_object(payload_part, "payload")


def _split(token: str, max_length: int) -> tuple[dict[str, Any], str, str, bytes]:
    if not isinstance(token, str) or len(token) > max_length or token.count(".") != 2:
        raise JwsRejected("a compact JWS is three base64url parts")
    header_part, payload_part, signature_part = token.split(".")
    header = _json_object(header_part, "header")
    if not payload_part.isascii():  # the signing input is ASCII; the payload's base64url is checked when read
        raise JwsRejected("the payload is not base64url")
    try:
        signature = b64url_decode(signature_part)
    except (binascii.Error, ValueError):
        raise JwsRejected("the signature is not base64url") from None
    return header, header_part, payload_part, signature


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _json_object(part: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise JwsRejected(f"the {name} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise JwsRejected(f"the {name} is not a JSON object")
    return value
