"""Wire format of regions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.http.schema import WireModel
from crypto.algorithms import Algorithm

# Absent: the deployment's crypto profile decides (ECARD_CRYPTO_PROFILE: international → Ed25519,
# national → SM2).
KeyAlgorithm = Annotated[Algorithm | None, msgspec.Meta(description="Ed25519 or SM2 (SM3); default: the profile's")]


class RegionCreate(WireModel):
    """A region to register, by GB/T 2260 code."""

    code: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$", examples=["510000"])]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, examples=["四川省"])]
    key_algorithm: KeyAlgorithm = None


# Absent: the deployment's default (ECARD_ISSUER_KEY_STORE).
KeyStore = Annotated[
    Literal["software", "pkcs11"] | None,
    msgspec.Meta(
        description="Where the private key is generated and kept: in software (encrypted in the database) or in "
        "the deployment's PKCS#11 token (it never leaves it); default: ECARD_ISSUER_KEY_STORE"
    ),
]


class KeyPublication(WireModel):
    """The next key of a rotation: of another algorithm than the current one, or in another store, if so named."""

    algorithm: KeyAlgorithm = None
    key_store: KeyStore = None


class RegionOut(WireModel):
    """A registered region."""

    code: str
    name: str
    created_at: datetime


class IssuerKeyOut(WireModel):
    """One of a region's signing keys and where it is in its rotation (never the private half)."""

    kid: str
    region: str
    state: str
    algorithm: Algorithm
    # "software" or "pkcs11": where the private half lives.
    key_store: str
    published_at: datetime
    jwk: dict[str, str]


class KeyRevocation(WireModel):
    """Why a key is withdrawn."""

    reason: Annotated[str, msgspec.Meta(min_length=3, max_length=500)]
