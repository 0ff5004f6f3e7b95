"""Without Redis, one worker only: the in-process nonce store is a lock file's worth of proof of that."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import IO

from app.settings import PROJECT_ROOT

LOCK_DIR = PROJECT_ROOT / "var"


class SingleWorkerError(RuntimeError):
    """The in-process nonce store is in use by another worker."""


def memory_store_lock_path(database_url: str) -> Path:
    """One lock per database: the workers of one deployment share it, test runs do not."""
    return LOCK_DIR / f"memory-store-{hashlib.sha256(database_url.encode()).hexdigest()[:16]}.lock"


def lock_single_worker(path: Path) -> IO[str]:
    """Hold an exclusive lock for the life of the process: a second worker cannot start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SingleWorkerError(
            "another worker already uses the in-process nonce store; without REDIS_URL the service "
            "runs one worker only (set REDIS_URL to run more)"
        ) from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
