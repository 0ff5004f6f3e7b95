"""Personal data at rest: AES-256-GCM encryption and a keyed blind index for look-ups.

The associated data binds each ciphertext to its column, so a value cannot be moved to another
field unnoticed.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_LENGTH = 12


class PiiCipher:
    """Encrypts and decrypts personal data fields, and computes their blind index."""

    def __init__(self, data_key: bytes, index_key: bytes) -> None:
        self._aead = AESGCM(data_key)
        self._index_key = index_key

    def encrypt_bytes(self, plaintext: bytes, field: str) -> bytes:
        """Nonce ‖ ciphertext ‖ tag of plaintext, bound to the field name."""
        nonce = os.urandom(NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, plaintext, field.encode())

    def decrypt_bytes(self, blob: bytes, field: str) -> bytes:
        """Inverse of `encrypt_bytes`; raises `cryptography.exceptions.InvalidTag` on tampering."""
        return self._aead.decrypt(blob[:NONCE_LENGTH], blob[NONCE_LENGTH:], field.encode())

    def encrypt(self, plaintext: str, field: str) -> bytes:
        """`encrypt_bytes` for text."""
        return self.encrypt_bytes(plaintext.encode(), field)

    def decrypt(self, blob: bytes, field: str) -> str:
        """`decrypt_bytes` for text."""
        return self.decrypt_bytes(blob, field).decode()

    def blind_index(self, value: str, field: str) -> bytes:
        """HMAC-SHA256 of the normalised value: equal inputs match, the index reveals nothing."""
        message = field.encode() + b"\x00" + value.strip().upper().encode()
        return hmac.new(self._index_key, message, hashlib.sha256).digest()
