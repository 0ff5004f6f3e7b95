"""Public keys as JWK / JWKS (RFC 7517, RFC 8037 OKP Ed25519)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from crypto.keys import VerifyKey, b64url, b64url_decode

REGION_MEMBER = "region"


def ed25519_jwk(public: bytes, kid: bytes) -> dict[str, str]:
    """An Ed25519 signature-verification key as a JWK (OKP, EdDSA)."""
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(public), "kid": b64url(kid), "alg": "EdDSA", "use": "sig"}


def public_jwk(key: VerifyKey) -> dict[str, str]:
    """One issuer key as a JWK; `region` names the region it signs for."""
    return {**ed25519_jwk(key.public, key.kid), REGION_MEMBER: key.region}


def jwks(keys: Iterable[VerifyKey]) -> dict[str, list[dict[str, str]]]:
    """A JWK Set of the given keys, in a stable order."""
    return {"keys": [public_jwk(key) for key in sorted(keys, key=lambda k: (k.region, k.kid))]}


def parse_jwks(document: Any) -> dict[bytes, VerifyKey]:
    """Read a JWKS into kid → key, checking that every kid matches its key.

    Raise ValueError on anything that is not an Ed25519 OKP key set; keys of other types are
    skipped, as RFC 7517 asks of a reader that does not understand them.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' array")
    keys: dict[bytes, VerifyKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        try:
            key = VerifyKey(public=b64url_decode(entry["x"]), region=str(entry[REGION_MEMBER]))
            kid = b64url_decode(entry["kid"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"bad JWK entry: {exc}") from None
        if kid != key.kid:
            raise ValueError(f"JWK kid {entry['kid']} does not match its key's thumbprint")
        keys[key.kid] = key
    return keys
