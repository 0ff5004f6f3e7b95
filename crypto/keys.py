"""Ed25519 issuer keys and their key ids, and what every issuer key offers (SM2 keys are in crypto/sm.py).

The kid is the first 8 bytes of the key's RFC 7638 JWK thumbprint, so anyone holding the
public key can recompute it and no registry is needed to agree on it.

An issuer key is Ed25519 or SM2; each names its COSE algorithm (`alg`), and a code is verified
by the key its kid names, with that key's algorithm, never by what the code's header claims
alone (crypto/cose.py, crypto/credential.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KID_LENGTH = 8
# COSE algorithms (RFC 9053): EdDSA is registered; SM2 has no registered value, so it takes one of the
# private-use range below -65536 (RFC 9052 §16.4; every one costs 5 CBOR bytes, -8 costs 1). -65537
# already names the credential's private claim, so the algorithm takes the next value.
ALG_EDDSA = -8
ALG_SM2_SM3 = -65538
ALGORITHM_NAMES = {ALG_EDDSA: "EdDSA", ALG_SM2_SM3: "SM2 with SM3"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raise ValueError on anything else."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("expected unpadded base64url text")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_thumbprint(public_raw: bytes) -> bytes:
    """RFC 7638 thumbprint (SHA-256) of an Ed25519 OKP public key."""
    members = {"crv": "Ed25519", "kty": "OKP", "x": b64url(public_raw)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(canonical).digest()


def kid_for(public_raw: bytes) -> bytes:
    """The 8-byte key id of an Ed25519 public key."""
    return jwk_thumbprint(public_raw)[:KID_LENGTH]


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte seed of an Ed25519 private key."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_private_pem(data: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key; raise ValueError otherwise."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the PEM does not hold an Ed25519 private key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """Serialise an Ed25519 private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class PublicKey(Protocol):
    """What verification needs of an issuer's public key, Ed25519 or SM2."""

    alg: ClassVar[int]

    @property
    def public(self) -> bytes:
        """The encoded public key (Ed25519: 32 raw bytes; SM2: the 65-byte point)."""
        ...

    @property
    def region(self) -> str:
        """The region the key signs for."""
        ...

    @property
    def kid(self) -> bytes:
        """The 8-byte key id."""
        ...

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when signature is this key's signature of message; never raises."""
        ...


class SigningUnavailable(RuntimeError):
    """The signer could not sign just now, for a reason outside the message (its module or service is away).

    Software keys never raise it; a key held in a PKCS#11 token (crypto/hsm.py) does when the token's
    session is gone. Issuance answers 503 and tries again on the next request; verification needs no
    private key and is not affected.
    """


class PrivateKey(Protocol):
    """The signer seam: what signing needs of an issuer's private key, wherever the key lives.

    In process (`SigningKey`, `crypto.sm.Sm2SigningKey`: the secret decrypted at start-up) or in a
    PKCS#11 token (`crypto.hsm.Pkcs11SigningKey`: the secret never leaves the token). Credentials,
    status lists and kits are signed only through `sign`; nothing asks a key for its secret except
    `crypto.algorithms.secret_of`, which refuses keys held in a module.
    """

    alg: ClassVar[int]
    # True when `sign` may wait on something outside the process (a device, a network call): callers on
    # an event loop run it in a thread. In-process keys sign in tens of microseconds and stay on the loop.
    blocking: ClassVar[bool]

    @property
    def public(self) -> bytes:
        """The encoded public key."""
        ...

    @property
    def kid(self) -> bytes:
        """The 8-byte key id."""
        ...

    def sign(self, message: bytes) -> bytes:
        """A 64-byte signature of message; `SigningUnavailable` when the key's module cannot sign now."""
        ...

    def verify_key(self, region: str) -> PublicKey:
        """The public half, for verification."""
        ...


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An issuer's private key with its kid, ready to sign credentials.

    Signing goes through libsodium (PyNaCl), like verification: about 15 µs a signature here
    against 27 µs through OpenSSL, and every open QR screen asks for signatures.
    """

    alg: ClassVar[int] = ALG_EDDSA
    blocking: ClassVar[bool] = False
    private: Ed25519PrivateKey
    kid: bytes = field(init=False)
    public: bytes = field(init=False)
    _sodium_secret: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        public = public_raw(self.private)
        object.__setattr__(self, "public", public)
        object.__setattr__(self, "kid", kid_for(public))
        object.__setattr__(self, "_sodium_secret", private_raw(self.private) + public)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """A key from its 32-byte seed."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over message."""
        return nacl.bindings.crypto_sign(message, self._sodium_secret)[: nacl.bindings.crypto_sign_BYTES]

    def verify_key(self, region: str) -> VerifyKey:
        """The public half, for verification."""
        return VerifyKey(public=self.public, region=region)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """An issuer's public key, the region it signs for, and its kid.

    Verification goes through libsodium (PyNaCl): on this hardware it verifies an Ed25519
    signature in about half the time OpenSSL takes through `cryptography`, and this runs
    once per scan on the hot path.
    """

    alg: ClassVar[int] = ALG_EDDSA
    public: bytes
    region: str
    kid: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.public) != 32:
            raise ValueError("an Ed25519 public key has 32 bytes")
        object.__setattr__(self, "kid", kid_for(self.public))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when signature is a valid Ed25519 signature of message under this key."""
        if len(signature) != 64:
            return False
        try:
            nacl.bindings.crypto_sign_open(signature + message, self.public)
        except nacl.exceptions.BadSignatureError:
            return False
        return True
