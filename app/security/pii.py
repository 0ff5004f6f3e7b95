"""Personal data at rest: authenticated encryption and a keyed blind index for look-ups.

Two schemes, chosen by the deployment's crypto profile (`ECARD_CRYPTO_PROFILE`, issue 17):

- international: AES-256-GCM, blob nonce (12) ‖ ciphertext ‖ tag (16), with no prefix (as it has
  always been written, byte for byte); blind index HMAC-SHA256.
- national: SM4-GCM, blob 0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16); blind index HMAC-SM3.

The associated data binds each ciphertext to its column, so a value cannot be moved to another
field unnoticed. A blob says what encrypted it: one that starts with the SM4 tag byte is opened with
SM4-GCM, any other with AES-GCM. An AES blob's random nonce starts with that byte once in 256, so a
blob whose SM4 opening fails is tried with AES-GCM before it is refused; GCM's tag makes a wrong
guess fail (2⁻¹²⁸), never return garbage. Either profile reads both kinds when it holds both keys.

A blind index computed with the other algorithm would miss, so while both index keys are in the
keyring (the dual-index period of a profile switch, docs/national-crypto.md) look-ups try both
(`blind_indexes`) and `ecard keys rekey-pii` moves the rows to the profile's scheme.
"""

from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.sm import SM4_KEY_LENGTH, Sm4GcmCipher, hmac_sm3

NONCE_LENGTH = 12
TAG_LENGTH = 16
INTERNATIONAL = "international"
NATIONAL = "national"
PROFILES = (INTERNATIONAL, NATIONAL)
# The first byte of an SM4-GCM blob (scheme "national", version 1). AES-GCM blobs have no prefix.
SM4_GCM_TAG = 0x01
_SM4_PREFIX = bytes([SM4_GCM_TAG])
PSEUDONYM_LABEL = "card-pseudonym"


class PiiCipher:
    """Encrypts and decrypts personal data fields, and computes their blind index.

    `data_key`/`index_key` are the international pair (AES-256, HMAC-SHA256 key), `sm4_key`/
    `sm3_index_key` the national pair (SM4, HMAC-SM3 key). The profile's pair is required; the other
    pair, when given, is only read (old blobs) and looked up (old indexes).
    """

    def __init__(
        self,
        data_key: bytes | None,
        index_key: bytes | None,
        *,
        sm4_key: bytes | None = None,
        sm3_index_key: bytes | None = None,
        profile: str = INTERNATIONAL,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown crypto profile {profile!r}")
        if (data_key is None) != (index_key is None) or (sm4_key is None) != (sm3_index_key is None):
            raise ValueError("a data key comes with its index key")
        if profile == INTERNATIONAL and data_key is None:
            raise ValueError("the international profile needs the AES data key and the HMAC-SHA256 index key")
        if profile == NATIONAL and sm4_key is None:
            raise ValueError("the national profile needs the SM4 data key and the HMAC-SM3 index key")
        if sm4_key is not None and len(sm4_key) != SM4_KEY_LENGTH:
            raise ValueError("an SM4 key has 16 bytes")
        self.profile = profile
        self._aead = AESGCM(data_key) if data_key is not None else None
        self._sm4 = Sm4GcmCipher(sm4_key) if sm4_key is not None else None
        self._index_key = index_key
        self._sm3_index_key = sm3_index_key

    @property
    def dual_index(self) -> bool:
        """Whether both index keys are held: look-ups then try both algorithms' indexes."""
        return self._index_key is not None and self._sm3_index_key is not None

    # --- encryption ---------------------------------------------------------------------------

    def encrypt_bytes(self, plaintext: bytes, field: str) -> bytes:
        """The profile's blob of plaintext, bound to the field name."""
        return self.encrypt_bytes_as(plaintext, field, self.profile)

    def encrypt_bytes_as(self, plaintext: bytes, field: str, profile: str) -> bytes:
        """The blob of plaintext under the given profile's scheme (re-keying writes the target's)."""
        if profile == NATIONAL:
            if self._sm4 is None:
                raise ValueError("no SM4 data key in the keyring")
            return _SM4_PREFIX + self._sm4.encrypt(plaintext, field.encode())
        if self._aead is None:
            raise ValueError("no AES data key in the keyring")
        nonce = os.urandom(NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, plaintext, field.encode())

    def decrypt_bytes(self, blob: bytes, field: str) -> bytes:
        """Inverse of `encrypt_bytes` for either scheme; raises `cryptography.exceptions.InvalidTag`
        on tampering, a wrong field, or a blob whose scheme's key the keyring lacks."""
        return self.open(blob, field)[0]

    def open(self, blob: bytes, field: str) -> tuple[bytes, str]:
        """The plaintext of blob and the profile whose scheme encrypted it."""
        associated = field.encode()
        if blob[:1] == _SM4_PREFIX and self._sm4 is not None:
            try:
                return self._sm4.decrypt(blob[1:], associated), NATIONAL
            except InvalidTag:
                pass  # perhaps an AES blob whose nonce starts with the tag byte
        if self._aead is None or len(blob) < NONCE_LENGTH + TAG_LENGTH:
            raise InvalidTag()
        return self._aead.decrypt(blob[:NONCE_LENGTH], blob[NONCE_LENGTH:], associated), INTERNATIONAL

    def encrypt(self, plaintext: str, field: str) -> bytes:
        """`encrypt_bytes` for text."""
        return self.encrypt_bytes(plaintext.encode(), field)

    def decrypt(self, blob: bytes, field: str) -> str:
        """`decrypt_bytes` for text."""
        return self.decrypt_bytes(blob, field).decode()

    # --- blind indexes ------------------------------------------------------------------------

    def blind_index(self, value: str, field: str) -> bytes:
        """The profile's keyed index of the normalised value: equal inputs match, it reveals nothing."""
        return self.blind_index_as(value, field, self.profile)

    def blind_index_as(self, value: str, field: str, profile: str) -> bytes:
        """The index under the given profile: HMAC-SHA256 (international) or HMAC-SM3 (national)."""
        message = field.encode() + b"\x00" + value.strip().upper().encode()
        if profile == NATIONAL:
            if self._sm3_index_key is None:
                raise ValueError("no HMAC-SM3 index key in the keyring")
            return hmac_sm3(self._sm3_index_key, message)
        if self._index_key is None:
            raise ValueError("no HMAC-SHA256 index key in the keyring")
        return hmac.digest(self._index_key, message, "sha256")  # one call into OpenSSL, not an HMAC object

    def blind_indexes(self, value: str, field: str) -> tuple[bytes, ...]:
        """Every index a stored row may carry: the profile's first, then, in the dual-index period,
        the other profile's."""
        own = self.blind_index(value, field)
        if not self.dual_index:
            return (own,)
        other = NATIONAL if self.profile == INTERNATIONAL else INTERNATIONAL
        return own, self.blind_index_as(value, field, other)

    def pseudonym_key(self) -> bytes:
        """The key of the holders' pseudonyms towards terminals (app/domain/verification/disclosure.py).

        Derived from the HMAC-SHA256 index key whenever it is held, so pseudonyms stay the same
        through a switch to the national profile; from the HMAC-SM3 key (with HMAC-SM3) only in a
        deployment without the international keys.
        """
        profile = INTERNATIONAL if self._index_key is not None else NATIONAL
        return self.blind_index_as(PSEUDONYM_LABEL, "verification.pseudonym_key", profile)
