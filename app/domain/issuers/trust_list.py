"""The trust list: every region's issuer keys with their rotation state, signed by the deployment.

Gates and other deployments pin the trust-list key (`trust.pem` in the key directory) once and
learn every region's keys — and every rotation — from the list: a key appears as `published`
before it signs, is `active` while it signs and stays as `retired` after, so nobody rejects a
genuine credential during a rotation. A compact JWS (EdDSA), so any JOSE library can check it.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from app.domain.issuers.services import IssuerKeys
from crypto.jwk import ed25519_jwk, public_jwk
from crypto.keys import SigningKey, b64url

TRUST_LIST_ISSUER = "ecard-trust-list"
TRUST_LIST_TYPE = "ecard-trust-list+jwt"


def signer_jwk(key: SigningKey) -> dict[str, str]:
    """The trust-list key's public JWK (what relying parties pin)."""
    return ed25519_jwk(key.public, key.kid)


def trust_list_claims(keys: IssuerKeys, issued_at: int, lifetime: int) -> dict[str, Any]:
    """The list's content: regions in code order, each with its keys oldest first."""
    regions: dict[str, list[dict[str, str]]] = {}
    for kid, key in sorted(keys.verify_keys.items(), key=lambda item: (item[1].region, keys.states[item[0]][1])):
        state, published_at = keys.states[kid]
        regions.setdefault(key.region, []).append(
            {**public_jwk(key), "status": state.value, "published_at": published_at.isoformat()}
        )
    return {
        "iss": TRUST_LIST_ISSUER,
        "iat": issued_at,
        "exp": issued_at + lifetime,
        "regions": [{"region": region, "keys": region_keys} for region, region_keys in sorted(regions.items())],
    }


def sign_trust_list(trust_key: SigningKey, keys: IssuerKeys, lifetime: int) -> str:
    """The current trust list as a compact JWS."""
    claims = trust_list_claims(keys, int(time.time()), lifetime)
    return jwt.encode(
        claims, trust_key.private, algorithm="EdDSA", headers={"kid": b64url(trust_key.kid), "typ": TRUST_LIST_TYPE}
    )
