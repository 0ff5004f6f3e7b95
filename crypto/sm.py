"""The national algorithms: SM2 signatures with SM3 (GM/T 0009 signer ID), SM3, HMAC-SM3 and SM4-GCM.

Building blocks of the national profile (issue 17), shaped like crypto/keys.py's Ed25519 keys so a
later step can hold either kind per issuer key. Libraries, chosen by measurement
(docs/national-crypto.md): gmalglib for SM2 signing (C, raw r‖s, signer ID as an argument, the
fastest signer here); the system's OpenSSL 3 for SM2 verification where it is there
(crypto/sm2_openssl.py, about twice gmalglib's speed), gmalglib otherwise; `cryptography` (OpenSSL)
for SM3, HMAC-SM3 and SM4-GCM.

Formats:
- signature: r ‖ s, 32 bytes each, big-endian (64 bytes, like Ed25519's), over
  e = SM3(ZA ‖ message) with ZA = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA) (GB/T 32918.2, GM/T 0009);
- public key: the uncompressed point 04 ‖ x ‖ y (65 bytes, GM/T 0009 §7.1);
- JWK: {"kty": "EC", "crv": "SM2", "x": …, "y": …} (base64url of the 32-byte coordinates, as
  RFC 7518 §6.2 writes P-256 keys; "SM2" is not in the IANA JOSE curve registry). The kid is the
  first 8 bytes of the RFC 7638 thumbprint of those four members, hashed with SM3 instead of SHA-256;
- SM4-GCM blob: nonce (12) ‖ ciphertext ‖ tag (16), like app/security/pii.py's AES-GCM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmalglib import sm2 as gm_sm2  # type: ignore[import-untyped]  # ships .pyi files without py.typed

from crypto import sm2_openssl
from crypto.keys import ALG_SM2_SM3, KID_LENGTH, b64url, b64url_decode

# ALG_SM2_SM3 (crypto/keys.py) is a private-use COSE value: COSE has no registered SM2 algorithm. The
# verifier binds the algorithm to the kid's key, so another deployment's use of the same number cannot
# confuse it.
DEFAULT_SIGNER_ID = b"1234567812345678"  # GM/T 0009-2012 §10: the ID when none is agreed
SIGNATURE_LENGTH = 64
PUBLIC_KEY_LENGTH = 65
PRIVATE_KEY_LENGTH = 32
SM3_LENGTH = 32
SM4_KEY_LENGTH = 16
GCM_NONCE_LENGTH = 12
GCM_TAG_LENGTH = 16
JWK_CURVE = "SM2"
# ENTL is a 16-bit bit length (GB/T 32918.2 §5.5); gmalglib caps the ID lower still.
MAX_SIGNER_ID_LENGTH = int(gm_sm2.SM2_UID_MAX_LENGTH)


def sm3(data: bytes) -> bytes:
    """SM3 digest (GB/T 32905), 32 bytes."""
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def hmac_sm3(key: bytes, message: bytes) -> bytes:
    """HMAC (RFC 2104) with SM3, 32 bytes: the national profile's keyed index and MAC."""
    mac = crypto_hmac.HMAC(key, hashes.SM3())
    mac.update(message)
    return mac.finalize()


def sm2_jwk_members(public: bytes) -> dict[str, str]:
    """The required JWK members of an SM2 public key, in RFC 7638 (lexicographic) order."""
    return {"crv": JWK_CURVE, "kty": "EC", "x": b64url(public[1:33]), "y": b64url(public[33:65])}


def sm2_thumbprint(public: bytes) -> bytes:
    """RFC 7638 thumbprint of the key's JWK, computed with SM3."""
    canonical = json.dumps(sm2_jwk_members(public), separators=(",", ":"), sort_keys=True).encode()
    return sm3(canonical)


def sm2_kid(public: bytes) -> bytes:
    """The 8-byte key id of an SM2 public key."""
    return sm2_thumbprint(public)[:KID_LENGTH]


def sm2_public_from_jwk(jwk: Any) -> bytes:
    """The 65-byte point of an SM2 JWK; raise ValueError when it is not one, or not on the curve."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != JWK_CURVE:
        raise ValueError("not an SM2 JWK (kty EC, crv SM2)")
    try:
        x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"bad SM2 JWK coordinates: {exc}") from None
    if len(x) != 32 or len(y) != 32:
        raise ValueError("SM2 JWK coordinates have 32 bytes each")
    public = b"\x04" + x + y
    if not gm_sm2.SM2.is_pk_valid(public):
        raise ValueError("the SM2 JWK's point is not on the curve")
    return public


def _check_signer_id(signer_id: bytes) -> None:
    if not isinstance(signer_id, bytes) or not 0 < len(signer_id) <= MAX_SIGNER_ID_LENGTH:
        raise ValueError(f"an SM2 signer ID has 1 to {MAX_SIGNER_ID_LENGTH} bytes")


@dataclass(frozen=True, slots=True)
class Sm2SigningKey:
    """An SM2 private key with its signer ID, public point and kid, ready to sign.

    The gmalglib object is made once: it holds the key and ZA, so a signature costs one
    fixed-base multiplication.
    """

    alg: ClassVar[int] = ALG_SM2_SM3
    blocking: ClassVar[bool] = False
    private: bytes = field(repr=False)
    signer_id: bytes = DEFAULT_SIGNER_ID
    public: bytes = field(init=False)
    kid: bytes = field(init=False)
    _signer: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private, bytes) or len(self.private) != PRIVATE_KEY_LENGTH:
            raise ValueError("an SM2 private key has 32 bytes")
        if not gm_sm2.SM2.is_sk_valid(self.private):
            raise ValueError("the SM2 private key is out of range (1 ≤ d ≤ n - 2)")
        _check_signer_id(self.signer_id)
        public = bytes(gm_sm2.SM2.get_pk(self.private, gm_sm2.SM2_PCMODE_RAW))
        object.__setattr__(self, "public", public)
        object.__setattr__(self, "kid", sm2_kid(public))
        object.__setattr__(self, "_signer", gm_sm2.SM2(sk=self.private, uid=self.signer_id))

    @classmethod
    def generate(cls, signer_id: bytes = DEFAULT_SIGNER_ID) -> Sm2SigningKey:
        """A fresh random key (gmalglib draws from /dev/urandom)."""
        private, _ = gm_sm2.SM2().generate_keypair()
        return cls(bytes(private), signer_id)

    def sign(self, message: bytes) -> bytes:
        """SM2 signature r ‖ s (64 bytes) over SM3(ZA ‖ message)."""
        return bytes(self._signer.sign(message))

    def verify_key(self, region: str) -> Sm2VerifyKey:
        """The public half, for verification."""
        return Sm2VerifyKey(public=self.public, region=region, signer_id=self.signer_id)


@dataclass(frozen=True, slots=True)
class Sm2VerifyKey:
    """An SM2 public key, the region it signs for, its signer ID and kid.

    Construction checks that the point is on the curve, so a bad key fails when it is loaded,
    not on the first scan.
    """

    alg: ClassVar[int] = ALG_SM2_SM3
    public: bytes
    region: str
    signer_id: bytes = DEFAULT_SIGNER_ID
    kid: bytes = field(init=False)
    _verifier: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.public, bytes) or len(self.public) != PUBLIC_KEY_LENGTH or self.public[0] != 4:
            raise ValueError("an SM2 public key is the 65-byte uncompressed point 04 ‖ x ‖ y")
        if not gm_sm2.SM2.is_pk_valid(self.public):
            raise ValueError("the SM2 public key is not a point on the curve")
        _check_signer_id(self.signer_id)
        object.__setattr__(self, "kid", sm2_kid(self.public))
        verifier = sm2_openssl.load(self.public, self.signer_id) or gm_sm2.SM2(pk=self.public, uid=self.signer_id)
        object.__setattr__(self, "_verifier", verifier)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when signature is this key's SM2 signature r ‖ s of message; never raises."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LENGTH or not isinstance(message, bytes):
            return False
        try:
            return bool(self._verifier.verify(message, signature))
        except (ValueError, OverflowError):
            return False

    def jwk(self) -> dict[str, str]:
        """The key as a JWK: the thumbprint members, kid, use and region."""
        return {**sm2_jwk_members(self.public), "kid": b64url(self.kid), "use": "sig", "region": self.region}


def sm2_verify(public: bytes, signature: bytes, message: bytes, signer_id: bytes = DEFAULT_SIGNER_ID) -> bool:
    """True when signature is public's SM2 signature of message; False for any bad input, key included."""
    try:
        key = Sm2VerifyKey(public=public, region="", signer_id=signer_id)
    except (ValueError, TypeError):
        return False
    return key.verify(signature, message)


def sm4_encrypt_block(key: bytes, block: bytes) -> bytes:
    """One raw SM4 block encryption (GB/T 32907): the primitive under SM4-GCM, for known-answer checks."""
    if len(key) != SM4_KEY_LENGTH or len(block) != 16:
        raise ValueError("SM4 takes a 16-byte key and a 16-byte block")
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()  # noqa: S305  # one block: no pattern to leak
    return encryptor.update(block) + encryptor.finalize()


class Sm4GcmCipher:
    """SM4-GCM (RFC 8998 §2.1's AEAD_SM4_GCM): nonce ‖ ciphertext ‖ tag, bound to associated data."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != SM4_KEY_LENGTH:
            raise ValueError("an SM4 key has 16 bytes")
        self._algorithm = algorithms.SM4(key)

    def encrypt(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Nonce ‖ ciphertext ‖ tag of plaintext, with a fresh random 96-bit nonce."""
        nonce = os.urandom(GCM_NONCE_LENGTH)
        encryptor = Cipher(self._algorithm, modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(associated_data)
        return nonce + encryptor.update(plaintext) + encryptor.finalize() + encryptor.tag

    def decrypt(self, blob: bytes, associated_data: bytes = b"") -> bytes:
        """Inverse of `encrypt`; raises `cryptography.exceptions.InvalidTag` on tampering or a short blob."""
        if len(blob) < GCM_NONCE_LENGTH + GCM_TAG_LENGTH:
            raise InvalidTag()
        nonce, body, tag = blob[:GCM_NONCE_LENGTH], blob[GCM_NONCE_LENGTH:-GCM_TAG_LENGTH], blob[-GCM_TAG_LENGTH:]
        decryptor = Cipher(self._algorithm, modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(associated_data)
        return decryptor.update(body) + decryptor.finalize()
