"""The service's own secrets: data key, blind-index key, session-token keys and trust-list keys.

The data and index keys come in two pairs, one per crypto profile (app/security/pii.py): the
international AES-256 key and HMAC-SHA256 key (data.key, index.key), the national SM4 key and
HMAC-SM3 key (sm4-data.key, sm3-index.key). The profile's pair is required; the other is optional and,
when present, read as well (a profile switch's dual-index period, docs/national-crypto.md). The trust
list is signed by the Ed25519 trust.pem, or under the national profile by the SM2 trust-sm2.key; the
API session tokens likewise by session.pem, or by session-sm2.key (every session key held verifies).

Loaded from `ECARD_KEYS_DIR`. In production mode the development keys in keys_dev/ are refused,
whether they are reached through that directory or copied elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from app.security.pii import INTERNATIONAL, NATIONAL, PiiCipher
from app.settings import DEV_KEYS_DIR, Settings
from crypto.keys import PrivateKey, SigningKey, load_private_pem, private_pem
from crypto.sm import PRIVATE_KEY_LENGTH as SM2_PRIVATE_KEY_LENGTH
from crypto.sm import SM4_KEY_LENGTH, Sm2SigningKey

DATA_KEY_FILE = "data.key"
INDEX_KEY_FILE = "index.key"
SESSION_KEY_FILE = "session.pem"
TRUST_KEY_FILE = "trust.pem"
SM4_DATA_KEY_FILE = "sm4-data.key"
SM3_INDEX_KEY_FILE = "sm3-index.key"
TRUST_SM2_KEY_FILE = "trust-sm2.key"
SESSION_SM2_KEY_FILE = "session-sm2.key"
# The data key file and index key file of each profile, and the data key's length.
PAIR_FILES = {
    INTERNATIONAL: (DATA_KEY_FILE, INDEX_KEY_FILE, 32),
    NATIONAL: (SM4_DATA_KEY_FILE, SM3_INDEX_KEY_FILE, SM4_KEY_LENGTH),
}


class KeyringError(RuntimeError):
    """The key directory is missing, unreadable or not allowed in this mode."""


@dataclass(frozen=True, slots=True)
class Keyring:
    """Secrets the service holds in memory."""

    # The international pair (AES-256-GCM, HMAC-SHA256); None in a national-only key directory.
    data_key: bytes | None
    index_key: bytes | None
    session_key: SigningKey
    # Signs the trust list of every region's keys, for gates and other deployments that pin it.
    trust_key: SigningKey
    # The national pair (SM4-GCM, HMAC-SM3); None when the directory has no national keys.
    sm4_key: bytes | None = None
    sm3_index_key: bytes | None = None
    # Signs the trust list under the national profile (SM2, the private scalar in base64).
    trust_sm2_key: Sm2SigningKey | None = None
    # Signs API session tokens under the national profile (SM2, the private scalar in base64).
    session_sm2_key: Sm2SigningKey | None = None

    def session_signer(self, profile: str) -> PrivateKey:
        """The key that signs session tokens under the profile (load_keyring made sure it is there)."""
        if profile == NATIONAL and self.session_sm2_key is not None:
            return self.session_sm2_key
        return self.session_key

    def session_keys(self) -> tuple[PrivateKey, ...]:
        """Every session key held: tokens of each verify, so a profile switch logs nobody out."""
        return (self.session_key,) if self.session_sm2_key is None else (self.session_key, self.session_sm2_key)

    def trust_signer(self, profile: str) -> PrivateKey:
        """The key that signs the trust list under the profile (load_keyring made sure it is there)."""
        if profile == NATIONAL and self.trust_sm2_key is not None:
            return self.trust_sm2_key
        return self.trust_key

    def pii(self, profile: str) -> PiiCipher:
        """The personal-data cipher of the profile, reading the other profile's blobs and indexes too."""
        return PiiCipher(
            self.data_key, self.index_key, sm4_key=self.sm4_key, sm3_index_key=self.sm3_index_key, profile=profile
        )


def _read_symmetric(path: Path, length: int = 32) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, binascii.Error) as exc:
        raise KeyringError(f"cannot read a base64 key from {path}: {exc}") from None
    if len(key) != length:
        raise KeyringError(f"{path} must hold {length} bytes, base64-encoded")
    return key


def _read_pair(directory: Path, profile: str) -> tuple[bytes, bytes] | None:
    """The profile's data and index keys; None when neither file exists; an error when one is missing."""
    data_file, index_file, length = PAIR_FILES[profile]
    data_path, index_path = directory / data_file, directory / index_file
    if not data_path.exists() and not index_path.exists():
        return None
    return _read_symmetric(data_path, length), _read_symmetric(index_path)


def _read_ed25519(path: Path) -> SigningKey:
    try:
        return SigningKey(load_private_pem(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise KeyringError(f"cannot read an Ed25519 PEM key from {path}: {exc}") from None


def _read_sm2(path: Path) -> Sm2SigningKey | None:
    if not path.exists():
        return None
    try:
        return Sm2SigningKey(_read_symmetric(path, SM2_PRIVATE_KEY_LENGTH))
    except ValueError as exc:
        raise KeyringError(f"{path} is not an SM2 private key: {exc}") from None


def read_keyring(directory: Path) -> Keyring:
    """Read the key files from directory: at least one data/index pair, the session and trust keys."""
    international = _read_pair(directory, INTERNATIONAL)
    national = _read_pair(directory, NATIONAL)
    if international is None and national is None:
        # The message of old: a directory without data.key is most likely the wrong directory.
        _read_symmetric(directory / DATA_KEY_FILE)
    return Keyring(
        data_key=international[0] if international else None,
        index_key=international[1] if international else None,
        session_key=_read_ed25519(directory / SESSION_KEY_FILE),
        trust_key=_read_ed25519(directory / TRUST_KEY_FILE),
        sm4_key=national[0] if national else None,
        sm3_index_key=national[1] if national else None,
        trust_sm2_key=_read_sm2(directory / TRUST_SM2_KEY_FILE),
        session_sm2_key=_read_sm2(directory / SESSION_SM2_KEY_FILE),
    )


def _same(key: bytes | None, dev: bytes | None) -> bool:
    return key is not None and dev is not None and hmac.compare_digest(key, dev)


def _same_sm2(key: Sm2SigningKey | None, dev: Sm2SigningKey | None) -> bool:
    return key is not None and dev is not None and key.public == dev.public


def _is_dev_keyring(keyring: Keyring) -> bool:
    dev = read_keyring(DEV_KEYS_DIR)
    return (
        _same(keyring.data_key, dev.data_key)
        or _same(keyring.index_key, dev.index_key)
        or _same(keyring.sm4_key, dev.sm4_key)
        or _same(keyring.sm3_index_key, dev.sm3_index_key)
        or keyring.session_key.public == dev.session_key.public
        or keyring.trust_key.public == dev.trust_key.public
        or _same_sm2(keyring.trust_sm2_key, dev.trust_sm2_key)
        or _same_sm2(keyring.session_sm2_key, dev.session_sm2_key)
    )


def load_keyring(settings: Settings) -> Keyring:
    """The keyring the settings name; in production mode, refuse development keys."""
    keyring = read_keyring(settings.keys_dir)
    if settings.crypto_profile == NATIONAL and keyring.sm4_key is None:
        raise KeyringError(
            f"ECARD_CRYPTO_PROFILE=national needs {SM4_DATA_KEY_FILE} and {SM3_INDEX_KEY_FILE} in {settings.keys_dir}"
            " (ecard keys generate --profile national --add)"
        )
    if settings.crypto_profile == NATIONAL and keyring.trust_sm2_key is None:
        raise KeyringError(
            f"ECARD_CRYPTO_PROFILE=national signs the trust list with SM2: it needs {TRUST_SM2_KEY_FILE} in"
            f" {settings.keys_dir} (ecard keys generate --profile national --add)"
        )
    if settings.crypto_profile == NATIONAL and keyring.session_sm2_key is None:
        raise KeyringError(
            f"ECARD_CRYPTO_PROFILE=national signs session tokens with SM2: it needs {SESSION_SM2_KEY_FILE} in"
            f" {settings.keys_dir} (ecard keys generate --profile national --add)"
        )
    if settings.crypto_profile != NATIONAL and keyring.data_key is None:
        raise KeyringError(
            f"the international profile needs {DATA_KEY_FILE} and {INDEX_KEY_FILE} in {settings.keys_dir}"
        )
    if settings.production:
        if settings.keys_dir.resolve() == DEV_KEYS_DIR.resolve():
            raise KeyringError("production mode refuses the development key directory keys_dev/")
        if DEV_KEYS_DIR.exists() and _is_dev_keyring(keyring):
            raise KeyringError(f"production mode refuses development keys found in {settings.keys_dir}")
    return keyring


def generate_keyring(directory: Path, profile: str = INTERNATIONAL, *, add: bool = False) -> list[str]:
    """Write a fresh key directory (files readable by the owner only) with the profile's data/index
    pair, the session key and the trust-list key (and, for the national profile, the SM2 trust-list and
    session keys); with `add`, only the profile's own keys, into an existing directory (the first step
    of a profile switch). Refuse to overwrite; the names written."""
    data_file, index_file, length = PAIR_FILES[profile]
    files = {
        data_file: base64.b64encode(os.urandom(length)) + b"\n",
        index_file: base64.b64encode(os.urandom(32)) + b"\n",
    }
    if profile == NATIONAL:
        files[TRUST_SM2_KEY_FILE] = base64.b64encode(Sm2SigningKey.generate().private) + b"\n"
        files[SESSION_SM2_KEY_FILE] = base64.b64encode(Sm2SigningKey.generate().private) + b"\n"
    if not add:
        files[SESSION_KEY_FILE] = private_pem(SigningKey.generate().private)
        files[TRUST_KEY_FILE] = private_pem(SigningKey.generate().private)
    elif not directory.is_dir():
        raise KeyringError(f"{directory} is not a key directory to add keys to")
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (directory / name).exists():
            raise KeyringError(f"{directory / name} exists; refusing to overwrite a key")
    for name, content in files.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    return list(files)
