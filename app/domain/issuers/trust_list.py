"""The trust list: every region's issuer keys with their rotation state, signed by the deployment.

Gates and other deployments pin the trust-list key (`trust.pem` in the key directory) once and
learn every region's keys — and every rotation — from the list: a key appears as `published`
before it signs, is `active` while it signs and stays as `retired` after, so nobody rejects a
genuine credential during a rotation. A compact JWS (crypto/trust_list.py): EdDSA, which any JOSE
library checks, or SM2 under the national profile (`trust-sm2.key`).
"""

from __future__ import annotations

import time
from typing import Any

from app.domain.issuers.services import IssuerKeys
from crypto import trust_list
from crypto.jwk import public_jwk
from crypto.keys import PrivateKey


def trust_list_claims(keys: IssuerKeys, issued_at: int, lifetime: int) -> dict[str, Any]:
    """The list's content: regions in code order, each with its keys oldest first."""
    regions: dict[str, list[dict[str, str]]] = {}
    for kid, key in sorted(keys.verify_keys.items(), key=lambda item: (item[1].region, keys.states[item[0]][1])):
        state, published_at = keys.states[kid]
        regions.setdefault(key.region, []).append(
            {**public_jwk(key), "status": state.value, "published_at": published_at.isoformat()}
        )
    return {
        "iss": trust_list.TRUST_LIST_ISSUER,
        "iat": issued_at,
        "exp": issued_at + lifetime,
        "regions": [{"region": region, "keys": region_keys} for region, region_keys in sorted(regions.items())],
    }


def sign_trust_list(trust_key: PrivateKey, keys: IssuerKeys, lifetime: int) -> str:
    """The current trust list as a compact JWS, signed by the trust-list key (Ed25519 or SM2)."""
    return trust_list.sign_trust_list(trust_key, trust_list_claims(keys, int(time.time()), lifetime))
