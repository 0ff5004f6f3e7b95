"""Issuer keys by algorithm name: what the database and the settings say ("Ed25519", "SM2") → keys.

One place maps the stored name to the key classes (crypto/keys.py, crypto/sm.py), so the service
never branches on the algorithm itself: it stores a name, a public key and an encrypted secret,
and gets back keys that sign and verify with their own algorithm.
"""

from __future__ import annotations

from typing import Final, Literal

from crypto.keys import ALG_SM2_SM3, PrivateKey, PublicKey, SigningKey, VerifyKey, private_raw
from crypto.sm import Sm2SigningKey, Sm2VerifyKey

Algorithm = Literal["Ed25519", "SM2"]
ED25519: Final = "Ed25519"
SM2: Final = "SM2"
ALGORITHMS: tuple[Algorithm, ...] = (ED25519, SM2)


def _known(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown issuer key algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def generate(algorithm: str) -> PrivateKey:
    """A fresh random issuer key of the algorithm."""
    _known(algorithm)
    return Sm2SigningKey.generate() if algorithm == SM2 else SigningKey.generate()


def secret_of(key: PrivateKey) -> bytes:
    """The 32 bytes to keep (encrypted) for a software key: Ed25519's seed, SM2's private scalar.

    A key held in a module (crypto/hsm.py) has no secret to give: TypeError."""
    if isinstance(key, Sm2SigningKey):
        return key.private
    if isinstance(key, SigningKey):
        return private_raw(key.private)
    raise TypeError(f"not an issuer key: {type(key).__name__}")


def private_key(algorithm: str, secret: bytes) -> PrivateKey:
    """The key kept as `secret_of` gave it."""
    _known(algorithm)
    return Sm2SigningKey(secret) if algorithm == SM2 else SigningKey.from_seed(secret)


def public_key(algorithm: str, public: bytes, region: str) -> PublicKey:
    """The public key of the algorithm, signing for region."""
    _known(algorithm)
    return Sm2VerifyKey(public=public, region=region) if algorithm == SM2 else VerifyKey(public=public, region=region)


def algorithm_of_public(public: bytes) -> Algorithm:
    """The algorithm of a raw public key by its form: 32 bytes Ed25519, the 65-byte point 04 ‖ x ‖ y SM2."""
    if len(public) == 32:
        return ED25519
    if len(public) == 65 and public[:1] == b"\x04":
        return SM2
    raise ValueError("a public key is 32 bytes (Ed25519) or the 65-byte uncompressed point 04 ‖ x ‖ y (SM2)")


def name_of(key: PublicKey | PrivateKey) -> Algorithm:
    """The stored name of a key's algorithm (by its COSE algorithm, so module-held keys answer too)."""
    return SM2 if key.alg == ALG_SM2_SM3 else ED25519
