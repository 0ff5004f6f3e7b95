"""The service's own secrets: data key, blind-index key, session-token key and trust-list key.

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

from app.settings import DEV_KEYS_DIR, Settings
from crypto.keys import SigningKey, load_private_pem, private_pem

DATA_KEY_FILE = "data.key"
INDEX_KEY_FILE = "index.key"
SESSION_KEY_FILE = "session.pem"
TRUST_KEY_FILE = "trust.pem"


class KeyringError(RuntimeError):
    """The key directory is missing, unreadable or not allowed in this mode."""


@dataclass(frozen=True, slots=True)
class Keyring:
    """Secrets the service holds in memory."""

    data_key: bytes
    index_key: bytes
    session_key: SigningKey
    # Signs the trust list of every region's keys, for gates and other deployments that pin it.
    trust_key: SigningKey


def _read_symmetric(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, binascii.Error) as exc:
        raise KeyringError(f"cannot read a base64 key from {path}: {exc}") from None
    if len(key) != 32:
        raise KeyringError(f"{path} must hold 32 bytes, base64-encoded")
    return key


def _read_ed25519(path: Path) -> SigningKey:
    try:
        return SigningKey(load_private_pem(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise KeyringError(f"cannot read an Ed25519 PEM key from {path}: {exc}") from None


def read_keyring(directory: Path) -> Keyring:
    """Read the four key files from directory."""
    return Keyring(
        data_key=_read_symmetric(directory / DATA_KEY_FILE),
        index_key=_read_symmetric(directory / INDEX_KEY_FILE),
        session_key=_read_ed25519(directory / SESSION_KEY_FILE),
        trust_key=_read_ed25519(directory / TRUST_KEY_FILE),
    )


def _is_dev_keyring(keyring: Keyring) -> bool:
    dev = read_keyring(DEV_KEYS_DIR)
    return (
        hmac.compare_digest(keyring.data_key, dev.data_key)
        or hmac.compare_digest(keyring.index_key, dev.index_key)
        or keyring.session_key.public == dev.session_key.public
        or keyring.trust_key.public == dev.trust_key.public
    )


def load_keyring(settings: Settings) -> Keyring:
    """The keyring the settings name; in production mode, refuse development keys."""
    keyring = read_keyring(settings.keys_dir)
    if settings.production:
        if settings.keys_dir.resolve() == DEV_KEYS_DIR.resolve():
            raise KeyringError("production mode refuses the development key directory keys_dev/")
        if DEV_KEYS_DIR.exists() and _is_dev_keyring(keyring):
            raise KeyringError(f"production mode refuses development keys found in {settings.keys_dir}")
    return keyring


def generate_keyring(directory: Path) -> None:
    """Write a fresh key directory (files readable by the owner only); refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        DATA_KEY_FILE: base64.b64encode(os.urandom(32)) + b"\n",
        INDEX_KEY_FILE: base64.b64encode(os.urandom(32)) + b"\n",
        SESSION_KEY_FILE: private_pem(SigningKey.generate().private),
        TRUST_KEY_FILE: private_pem(SigningKey.generate().private),
    }
    for name in files:
        if (directory / name).exists():
            raise KeyringError(f"{directory / name} exists; refusing to overwrite a key")
    for name, content in files.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
