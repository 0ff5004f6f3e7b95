"""Settings, read from the environment once.

Defaults run on a laptop with nothing installed: a SQLite file under var/, an in-process
nonce store (single worker only) and the development keys in keys_dev/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEV_KEYS_DIR = PROJECT_ROOT / "keys_dev"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment."""

    # "development" accepts keys_dev/; "production" refuses them and demands REDIS_URL.
    mode: str = "development"
    database_url: str = f"sqlite+aiosqlite:///{PROJECT_ROOT / 'var' / 'ecard.sqlite3'}"
    # Empty: nonces and the card-status mirror live in process memory (one worker only).
    redis_url: str = ""
    # Prefix for every Redis key and channel, so deployments (and test runs) can share a server.
    redis_prefix: str = "ecard:"
    keys_dir: Path = DEV_KEYS_DIR
    credential_lifetime: int = 60
    credential_refresh: int = 30
    credential_bundle_max: int = 20
    clock_skew: int = 5
    access_token_ttl: int = 900
    refresh_token_ttl: int = 30 * 24 * 3600
    activation_code_ttl: int = 72 * 3600
    activation_max_attempts: int = 5
    # A full reload of the verifier caches, in case an invalidation message was missed.
    cache_refresh_interval: float = 30.0
    workers: int = 1

    @property
    def production(self) -> bool:
        """Whether the service runs in production mode."""
        return self.mode == "production"

    @classmethod
    def from_env(cls) -> Settings:
        """Read settings from ECARD_* variables and the conventional DATABASE_URL / REDIS_URL."""
        defaults = cls()
        mode = _env("ECARD_MODE", defaults.mode)
        if mode not in ("development", "production"):
            raise ValueError(f"ECARD_MODE must be 'development' or 'production', got {mode!r}")
        return cls(
            mode=mode,
            database_url=_env("DATABASE_URL", defaults.database_url),
            redis_url=_env("REDIS_URL", defaults.redis_url),
            redis_prefix=_env("ECARD_REDIS_PREFIX", defaults.redis_prefix),
            keys_dir=Path(_env("ECARD_KEYS_DIR", str(defaults.keys_dir))),
            credential_lifetime=_env_int("ECARD_CREDENTIAL_LIFETIME", defaults.credential_lifetime),
            credential_refresh=_env_int("ECARD_CREDENTIAL_REFRESH", defaults.credential_refresh),
            credential_bundle_max=_env_int("ECARD_CREDENTIAL_BUNDLE_MAX", defaults.credential_bundle_max),
            clock_skew=_env_int("ECARD_CLOCK_SKEW", defaults.clock_skew),
            access_token_ttl=_env_int("ECARD_ACCESS_TOKEN_TTL", defaults.access_token_ttl),
            refresh_token_ttl=_env_int("ECARD_REFRESH_TOKEN_TTL", defaults.refresh_token_ttl),
            activation_code_ttl=_env_int("ECARD_ACTIVATION_CODE_TTL", defaults.activation_code_ttl),
            workers=_env_int("WEB_CONCURRENCY", defaults.workers),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()
