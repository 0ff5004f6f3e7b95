"""Ed25519 issuer keys and their key ids.

The kid is the first 8 bytes of the key's RFC 7638 JWK thumbprint, so anyone holding the
public key can recompute it and no registry is needed to agree on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KID_LENGTH = 8
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


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An issuer's private key with its kid, ready to sign credentials.

    Signing goes through libsodium (PyNaCl), like verification: about 15 µs a signature here
    against 27 µs through OpenSSL, and every open QR screen asks for signatures.
    """

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
