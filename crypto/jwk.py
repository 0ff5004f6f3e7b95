"""Public keys as JWK / JWKS: RFC 8037 OKP Ed25519, and SM2 as {"kty": "EC", "crv": "SM2"} (crypto/sm.py).

SM2 is not in the IANA JOSE registries: its JWK is written like RFC 7518 §6.2's P-256 keys, with
"crv": "SM2" and "alg": "SM2" (the COSE value is private use, crypto/keys.py). A reader that knows
neither kind skips the entry, as RFC 7517 asks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from crypto.keys import ALG_SM2_SM3, PublicKey, VerifyKey, b64url, b64url_decode
from crypto.sm import JWK_CURVE, Sm2VerifyKey, sm2_jwk_members, sm2_public_from_jwk

REGION_MEMBER = "region"


def ed25519_jwk(public: bytes, kid: bytes) -> dict[str, str]:
    """An Ed25519 signature-verification key as a JWK (OKP, EdDSA)."""
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(public), "kid": b64url(kid), "alg": "EdDSA", "use": "sig"}


def public_jwk(key: PublicKey) -> dict[str, str]:
    """One issuer key as a JWK; `region` names the region it signs for."""
    if key.alg == ALG_SM2_SM3:
        members = {**sm2_jwk_members(key.public), "kid": b64url(key.kid), "alg": "SM2", "use": "sig"}
        return {**members, REGION_MEMBER: key.region}
    return {**ed25519_jwk(key.public, key.kid), REGION_MEMBER: key.region}


def _read_key(entry: dict[str, Any]) -> PublicKey | None:
    """The issuer key of one JWK entry; None for a kind this profile does not know."""
    if entry.get("kty") == "OKP" and entry.get("crv") == "Ed25519":
        return VerifyKey(public=b64url_decode(entry["x"]), region=str(entry[REGION_MEMBER]))
    if entry.get("kty") == "EC" and entry.get("crv") == JWK_CURVE:
        return Sm2VerifyKey(public=sm2_public_from_jwk(entry), region=str(entry[REGION_MEMBER]))
    return None


def jwks(keys: Iterable[PublicKey]) -> dict[str, list[dict[str, str]]]:
    """A JWK Set of the given keys, in a stable order."""
    return {"keys": [public_jwk(key) for key in sorted(keys, key=lambda k: (k.region, k.kid))]}


def parse_jwks(document: Any) -> dict[bytes, PublicKey]:
    """Read a JWKS into kid → key, checking that every kid matches its key.

    Raise ValueError on a bad Ed25519 or SM2 entry; keys of other types are skipped, as RFC 7517
    asks of a reader that does not understand them.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' array")
    keys: dict[bytes, PublicKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        try:
            key = _read_key(entry)
            if key is None:
                continue
            kid = b64url_decode(entry["kid"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"bad JWK entry: {exc}") from None
        if kid != key.kid:
            raise ValueError(f"JWK kid {entry['kid']} does not match its key's thumbprint")
        keys[key.kid] = key
    return keys
