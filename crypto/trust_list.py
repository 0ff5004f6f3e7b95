"""The trust list as a compact JWS, signed and checked by Ed25519 (EdDSA) or SM2 ("SM2", private use).

The trust list (app/domain/issuers/trust_list.py has its content) is what gates and other
deployments pin once and refetch: every region's keys with their rotation state. The national
profile signs it with SM2 (GB/T 39786 expects national algorithms for the integrity of key
distribution), the international one with Ed25519, so any JOSE library can check that one.

JOSE registers no SM2 algorithm. Like the JWK of an SM2 key (crypto/jwk.py, `"alg": "SM2"`), the
JWS header then says `"alg": "SM2"`: an SM2 signature r ‖ s (64 bytes, big-endian, base64url) with
SM3 and the default signer ID of GM/T 0009 over the JWS signing input, ASCII(header "." payload),
exactly as RFC 7515 signs with any other algorithm. The pinned key decides which check runs: an
Ed25519 key never accepts an "SM2" header, nor the reverse, and nothing but EdDSA and SM2 is read.

The header is exactly {"alg", "kid", "typ"}: a member more (a `crit`, a `jwk` to trust instead of
the pinned key) is refused, as the credential's exact protected header is.
"""

from __future__ import annotations

import binascii
import json
import time
from collections.abc import Mapping
from typing import Any

from crypto.jwk import ed25519_jwk
from crypto.keys import PrivateKey, SigningKey, VerifyKey, b64url, b64url_decode
from crypto.sm import JWK_CURVE, Sm2SigningKey, Sm2VerifyKey, sm2_jwk_members, sm2_public_from_jwk

TRUST_LIST_ISSUER = "ecard-trust-list"
TRUST_LIST_TYPE = "ecard-trust-list+jwt"
EDDSA = "EdDSA"
SM2 = "SM2"
# A list far larger than this is not a trust list (a province has a few keys per region).
MAX_TOKEN_LENGTH = 1 << 20
# Clock skew tolerated on iat, seconds.
LEEWAY = 60


class TrustListRejected(ValueError):
    """The token is not a valid trust list under the pinned key; the message says why."""


def signer_jwk(key: PrivateKey) -> dict[str, str]:
    """The public JWK of a trust-list key (what relying parties pin): OKP Ed25519, or EC SM2."""
    if isinstance(key, Sm2SigningKey):
        return {**sm2_jwk_members(key.public), "kid": b64url(key.kid), "alg": SM2, "use": "sig"}
    return ed25519_jwk(key.public, key.kid)


def sign_trust_list(key: PrivateKey, claims: Mapping[str, Any]) -> str:
    """The claims as a compact JWS signed by key: EdDSA for an Ed25519 key, SM2 for an SM2 key."""
    if not isinstance(key, SigningKey | Sm2SigningKey):
        raise TypeError(f"not a trust-list key: {type(key).__name__}")
    alg = SM2 if isinstance(key, Sm2SigningKey) else EDDSA
    header = {"alg": alg, "kid": b64url(key.kid), "typ": TRUST_LIST_TYPE}
    signing_input = _segment(header) + "." + _segment(dict(claims))
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


def verify_trust_list(token: str, pinned: Mapping[str, Any], now: int | None = None) -> dict[str, Any]:
    """The claims of a trust list signed by the pinned key (its public JWK), still valid at now."""
    key, alg = _pinned_key(pinned)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise TrustListRejected("a trust list is a compact JWS: three base64url parts")
    header_part, payload_part, signature_part = token.split(".")
    header = _json_object(header_part, "header")
    if set(header) != {"alg", "kid", "typ"}:
        raise TrustListRejected(f"the header must be exactly alg, kid and typ, not {sorted(header)}")
    if header["alg"] != alg:
        raise TrustListRejected(f"the pinned key verifies {alg}, the header says {header['alg']!r}")
    if header["typ"] != TRUST_LIST_TYPE or header["kid"] != pinned.get("kid"):
        raise TrustListRejected("typ or kid is not the pinned trust-list key's")
    try:
        signature = b64url_decode(signature_part)
    except (binascii.Error, ValueError):
        raise TrustListRejected("the signature is not base64url") from None
    if not key.verify(signature, (header_part + "." + payload_part).encode("ascii")):
        raise TrustListRejected("the signature does not verify under the pinned key")
    claims = _json_object(payload_part, "payload")
    moment = int(time.time()) if now is None else now
    exp, iat = claims.get("exp"), claims.get("iat")
    if claims.get("iss") != TRUST_LIST_ISSUER or type(exp) is not int or type(iat) is not int:
        raise TrustListRejected("iss, iat and exp are not a trust list's")
    if exp <= moment or iat > moment + LEEWAY:
        raise TrustListRejected("the trust list has expired, or is issued in the future")
    return claims


def _pinned_key(jwk: Mapping[str, Any]) -> tuple[VerifyKey | Sm2VerifyKey, str]:
    """The pinned JWK as a key, and the one JWS algorithm it verifies."""
    try:
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            return VerifyKey(public=b64url_decode(str(jwk["x"])), region=""), EDDSA
        if jwk.get("kty") == "EC" and jwk.get("crv") == JWK_CURVE:
            return Sm2VerifyKey(public=sm2_public_from_jwk(jwk), region=""), SM2
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise TrustListRejected(f"the pinned key is not a valid JWK: {exc}") from None
    raise TrustListRejected("the pinned key is neither an Ed25519 nor an SM2 JWK")


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _json_object(part: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TrustListRejected(f"the {name} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise TrustListRejected(f"the {name} is not a JSON object")
    return value
