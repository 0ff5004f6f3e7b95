"""Passwords and PINs: argon2id hashes, computed off the event loop.

One argon2 verification takes a few hundred milliseconds of CPU by design; on the event loop it
would freeze every request of the worker, /v1/verify included, so it runs in a thread.
"""

from __future__ import annotations

import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

# Verified when an account is unknown or locked, so a miss costs as long as a wrong password.
DUMMY_HASH = _hasher.hash("not a real secret, only for timing")


async def hash_secret(secret: str) -> str:
    """The argon2id hash of secret."""
    return await anyio.to_thread.run_sync(_hasher.hash, secret)


async def verify_secret(secret_hash: str, secret: str) -> bool:
    """Whether secret matches the hash; never raises for a mismatch or a malformed hash."""

    def verify() -> bool:
        try:
            return _hasher.verify(secret_hash, secret)
        except (VerificationError, InvalidHashError):
            return False

    return await anyio.to_thread.run_sync(verify)
