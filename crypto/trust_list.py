"""The trust list as a compact JWS, signed and checked by Ed25519 (EdDSA) or SM2 ("SM2", private use).

The trust list (app/domain/issuers/trust_list.py has its content) is what gates and other
deployments pin once and refetch: every region's keys with their rotation state. The national
profile signs it with SM2 (GB/T 39786 expects national algorithms for the integrity of key
distribution), the international one with Ed25519, so any JOSE library can check that one.

The JWS itself, and what `"alg": "SM2"` means, is crypto/jws.py's (the session tokens use it too).
The pinned key decides which check runs: an Ed25519 key never accepts an "SM2" header, nor the
reverse, and nothing but EdDSA and SM2 is read.

The header is exactly {"alg", "kid", "typ"}: a member more (a `crit`, a `jwk` to trust instead of
the pinned key) is refused, as the credential's exact protected header is.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Mapping
from typing import Any

from crypto.jwk import ed25519_jwk
from crypto.jws import SM2, JwsRejected, algorithm_of, open_compact, read_header, sign_compact
from crypto.keys import PrivateKey, PublicKey, SigningKey, VerifyKey, b64url, b64url_decode
from crypto.sm import JWK_CURVE, Sm2SigningKey, Sm2VerifyKey, sm2_jwk_members, sm2_public_from_jwk

TRUST_LIST_ISSUER = "ecard-trust-list"
TRUST_LIST_TYPE = "ecard-trust-list+jwt"
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
    return sign_compact(key, {"kid": b64url(key.kid), "typ": TRUST_LIST_TYPE}, claims)


def verify_trust_list(token: str, pinned: Mapping[str, Any], now: int | None = None) -> dict[str, Any]:
    """The claims of a trust list signed by the pinned key (its public JWK), still valid at now."""
    key = _pinned_key(pinned)
    try:
        header = read_header(token, MAX_TOKEN_LENGTH)
        if set(header) != {"alg", "kid", "typ"}:
            raise TrustListRejected(f"the header must be exactly alg, kid and typ, not {sorted(header)}")
        if header["alg"] != algorithm_of(key):
            raise TrustListRejected(f"the pinned key verifies {algorithm_of(key)}, the header says {header['alg']!r}")
        if header["typ"] != TRUST_LIST_TYPE or header["kid"] != pinned.get("kid"):
            raise TrustListRejected("typ or kid is not the pinned trust-list key's")
        _, claims = open_compact(token, {header["kid"]: key}, MAX_TOKEN_LENGTH)
    except JwsRejected as exc:
        raise TrustListRejected(str(exc)) from None
    moment = int(time.time()) if now is None else now
    exp, iat = claims.get("exp"), claims.get("iat")
    if claims.get("iss") != TRUST_LIST_ISSUER or type(exp) is not int or type(iat) is not int:
        raise TrustListRejected("iss, iat and exp are not a trust list's")
    if exp <= moment or iat > moment + LEEWAY:
        raise TrustListRejected("the trust list has expired, or is issued in the future")
    return claims


def _pinned_key(jwk: Mapping[str, Any]) -> PublicKey:
    """The pinned JWK as a key (which decides the one JWS algorithm it verifies)."""
    try:
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            return VerifyKey(public=b64url_decode(str(jwk["x"])), region="")
        if jwk.get("kty") == "EC" and jwk.get("crv") == JWK_CURVE:
            return Sm2VerifyKey(public=sm2_public_from_jwk(jwk), region="")
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise TrustListRejected(f"the pinned key is not a valid JWK: {exc}") from None
    raise TrustListRejected("the pinned key is neither an Ed25519 nor an SM2 JWK")
