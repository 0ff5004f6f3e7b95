"""Settings, read from the environment once.

Defaults run on a laptop with nothing installed: a SQLite file under var/, an in-process
nonce store (single worker only) and the development keys in keys_dev/.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEV_KEYS_DIR = PROJECT_ROOT / "keys_dev"
DATA_DIR = PROJECT_ROOT / "app" / "data"


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


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _ratio(name: str, default: float) -> float:
    value = _env_float(name, default)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return value


def _networks(name: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks, e.g. `10.0.0.0/8,127.0.0.1` (checked, kept as text)."""
    items = tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())
    try:
        for item in items:
            ipaddress.ip_network(item)
    except ValueError as exc:
        raise ValueError(f"{name} must list IP addresses or networks: {exc}") from None
    return items


def _public_url(name: str) -> str:
    """The service's public base URL (`https://ecard.example`, maybe with a path prefix), or empty."""
    raw = os.environ.get(name, "").strip().rstrip("/")
    if not raw:
        return ""
    scheme, separator, rest = raw.partition("://")
    if scheme.lower() not in ("http", "https") or not separator or not rest or "?" in rest or "#" in rest:
        raise ValueError(f"{name} must be an http(s) base URL without query or fragment, got {raw!r}")
    return raw


def _log_levels(name: str) -> tuple[tuple[str, str], ...]:
    """`logger=LEVEL` pairs, comma-separated, e.g. `app.domain.imports=DEBUG,uvicorn=WARNING`."""
    levels: list[tuple[str, str]] = []
    for item in os.environ.get(name, "").split(","):
        if not item.strip():
            continue
        logger, _, level = item.partition("=")
        levels.append((logger.strip(), _log_level(name, level)))
    return tuple(levels)


def _log_level(name: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"{name}: unknown log level {raw!r}")
    return level


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
    # REDIS_URL names a node of a Redis Cluster (ECARD_REDIS_CLUSTER=1): the client finds the rest.
    redis_cluster: bool = False
    # How many cards the deployment expects: sizes the mirror's bucket hashes (app/stores/status_mirror.py,
    # `MirrorLayout`); changing it means refilling the mirror (`ecard status reconcile --repair`).
    mirror_capacity: int = 1_000_000
    keys_dir: Path = DEV_KEYS_DIR
    credential_lifetime: int = 60
    credential_refresh: int = 30
    credential_bundle_max: int = 20
    clock_skew: int = 5
    access_token_ttl: int = 900
    refresh_token_ttl: int = 30 * 24 * 3600
    activation_code_ttl: int = 72 * 3600
    activation_max_attempts: int = 5
    # How often workers look at the directory's change counter (one row) and apply the changes since they last did.
    directory_poll_interval: float = 1.0
    workers: int = 1
    # The terminal that used a credential gets the same answer again within this many seconds.
    verify_retry_window: int = 10
    # A used nonce is remembered this long past its credential's expiry, so a gate's batch of
    # offline scans uploaded a little later still meets the online use (older: the event log).
    nonce_memory: int = 300
    # While the mirror is refilled after a store loss: scans of cards it lacks answered from the
    # database, at most this many per second per worker (0: never; they stay card_unknown).
    verify_fallback_rate: float = 200.0
    # Whether workers watch the store for a loss and refill it from the database themselves (one at a time).
    mirror_recovery: bool = True
    # How old a queued offline scan may be when its gate uploads it.
    offline_scan_window: int = 24 * 3600
    # Whether this process drains the verification event stream into the database. Default: yes
    # for the embedded setup (no REDIS_URL), no with Redis, where `ecard events drain` does it.
    drain_events: bool | None = None
    # Offline kit: a signed status list is good for status_list_lifetime; gates refetch after ttl.
    status_list_ttl: int = 300
    status_list_lifetime: int = 3600
    # A new issuer key must be published this long before it may sign: twice the JWKS cache time.
    key_publish_lead: int = 600
    # How long a signed trust list is valid; gates and other deployments refetch well before.
    trust_list_lifetime: int = 24 * 3600
    # "international": new issuer keys are Ed25519; "national": SM2 with SM3 (issue 17, docs/national-crypto.md).
    # A region's key rotation may also name the algorithm of its next key (POST …/keys).
    crypto_profile: str = "international"
    # Where new issuer keys are generated: "software" (the secret encrypted in the database) or "pkcs11"
    # (in the token below; the secret never leaves it). Each stored key says where it lives; a region's
    # rotation may also name the store of its next key (POST …/keys). docs/mipin.md, "The signer seam".
    issuer_key_store: str = "software"
    # The PKCS#11 module (the vendor's .so), the token's label, and the user PIN: from a file
    # (ECARD_PKCS11_PIN_FILE, preferred) or ECARD_PKCS11_PIN. Empty module: no token is opened.
    pkcs11_module: str = ""
    pkcs11_token: str = ""
    pkcs11_pin_file: str = ""
    pkcs11_pin: str = field(default="", repr=False)
    # SM2 in a module: its vendor values, `key_type=0x…,generate=0x…,sign=0x…` (PKCS#11 has none for SM2).
    pkcs11_sm2: str = ""
    # Cooperation agreements between regions (which cards a terminal accepts from elsewhere).
    agreements_file: Path = DATA_DIR / "agreements.json"
    # Insurance shares of medical bills by region and scheme.
    medical_coverage_file: Path = DATA_DIR / "medical_coverage.json"
    # The root logger's level, and levels of named loggers over it (ECARD_LOG_LEVELS).
    log_level: str = "INFO"
    log_levels: tuple[tuple[str, str], ...] = ()
    # Peers whose X-Request-Id is taken as the request's id (the load balancer); others get a new one.
    trusted_proxies: tuple[str, ...] = ()
    # The scheme, host and path prefix clients use to reach the service (`https://ecard.example`), where a
    # TLS-terminating proxy stands in front: DPoP proofs name this URI. Empty: each request's own.
    public_url: str = ""
    # OpenTelemetry traces go to this OTLP/HTTP collector; empty: no tracing at all.
    otlp_endpoint: str = ""
    # The share of requests traced (a parent's decision, sent in `traceparent`, is followed).
    trace_sample_ratio: float = 0.01

    @property
    def drains_events(self) -> bool:
        """Whether this process runs the event drain (see `drain_events`)."""
        return self.drain_events if self.drain_events is not None else not self.redis_url

    @property
    def issuer_algorithm(self) -> str:
        """The algorithm of new issuer keys under the deployment's crypto profile."""
        return "SM2" if self.crypto_profile == "national" else "Ed25519"

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
        profile = _env("ECARD_CRYPTO_PROFILE", defaults.crypto_profile)
        if profile not in ("international", "national"):
            raise ValueError(f"ECARD_CRYPTO_PROFILE must be 'international' or 'national', got {profile!r}")
        key_store = _env("ECARD_ISSUER_KEY_STORE", defaults.issuer_key_store)
        if key_store not in ("software", "pkcs11"):
            raise ValueError(f"ECARD_ISSUER_KEY_STORE must be 'software' or 'pkcs11', got {key_store!r}")
        pkcs11_module = _env("ECARD_PKCS11_MODULE", "")
        if key_store == "pkcs11" and not pkcs11_module:
            raise ValueError("ECARD_ISSUER_KEY_STORE=pkcs11 needs ECARD_PKCS11_MODULE (the module's .so)")
        if pkcs11_module and not _env("ECARD_PKCS11_TOKEN", ""):
            raise ValueError("ECARD_PKCS11_MODULE needs ECARD_PKCS11_TOKEN (the token's label)")
        return cls(
            mode=mode,
            crypto_profile=profile,
            issuer_key_store=key_store,
            pkcs11_module=pkcs11_module,
            pkcs11_token=_env("ECARD_PKCS11_TOKEN", ""),
            pkcs11_pin_file=_env("ECARD_PKCS11_PIN_FILE", ""),
            pkcs11_pin=_env("ECARD_PKCS11_PIN", ""),
            pkcs11_sm2=_env("ECARD_PKCS11_SM2", ""),
            database_url=_env("DATABASE_URL", defaults.database_url),
            redis_url=_env("REDIS_URL", defaults.redis_url),
            redis_prefix=_env("ECARD_REDIS_PREFIX", defaults.redis_prefix),
            redis_cluster=bool(_env_bool("ECARD_REDIS_CLUSTER")),
            mirror_capacity=_env_int("ECARD_MIRROR_CAPACITY", defaults.mirror_capacity),
            keys_dir=Path(_env("ECARD_KEYS_DIR", str(defaults.keys_dir))),
            credential_lifetime=_env_int("ECARD_CREDENTIAL_LIFETIME", defaults.credential_lifetime),
            credential_refresh=_env_int("ECARD_CREDENTIAL_REFRESH", defaults.credential_refresh),
            credential_bundle_max=_env_int("ECARD_CREDENTIAL_BUNDLE_MAX", defaults.credential_bundle_max),
            clock_skew=_env_int("ECARD_CLOCK_SKEW", defaults.clock_skew),
            access_token_ttl=_env_int("ECARD_ACCESS_TOKEN_TTL", defaults.access_token_ttl),
            refresh_token_ttl=_env_int("ECARD_REFRESH_TOKEN_TTL", defaults.refresh_token_ttl),
            activation_code_ttl=_env_int("ECARD_ACTIVATION_CODE_TTL", defaults.activation_code_ttl),
            workers=_env_int("WEB_CONCURRENCY", defaults.workers),
            verify_retry_window=_env_int("ECARD_VERIFY_RETRY_WINDOW", defaults.verify_retry_window),
            nonce_memory=_env_int("ECARD_NONCE_MEMORY", defaults.nonce_memory),
            verify_fallback_rate=_env_float("ECARD_VERIFY_FALLBACK_RATE", defaults.verify_fallback_rate),
            mirror_recovery=_env_bool("ECARD_MIRROR_RECOVERY") is not False,
            offline_scan_window=_env_int("ECARD_OFFLINE_SCAN_WINDOW", defaults.offline_scan_window),
            drain_events=_env_bool("ECARD_DRAIN_EVENTS"),
            status_list_ttl=_env_int("ECARD_STATUS_LIST_TTL", defaults.status_list_ttl),
            status_list_lifetime=_env_int("ECARD_STATUS_LIST_LIFETIME", defaults.status_list_lifetime),
            key_publish_lead=_env_int("ECARD_KEY_PUBLISH_LEAD", defaults.key_publish_lead),
            trust_list_lifetime=_env_int("ECARD_TRUST_LIST_LIFETIME", defaults.trust_list_lifetime),
            agreements_file=Path(_env("ECARD_AGREEMENTS_FILE", str(defaults.agreements_file))),
            medical_coverage_file=Path(_env("ECARD_MEDICAL_COVERAGE_FILE", str(defaults.medical_coverage_file))),
            log_level=_log_level("ECARD_LOG_LEVEL", _env("ECARD_LOG_LEVEL", defaults.log_level)),
            log_levels=_log_levels("ECARD_LOG_LEVELS"),
            trusted_proxies=_networks("ECARD_TRUSTED_PROXIES"),
            public_url=_public_url("ECARD_PUBLIC_URL"),
            otlp_endpoint=_env("OTEL_EXPORTER_OTLP_ENDPOINT", defaults.otlp_endpoint),
            trace_sample_ratio=_ratio("ECARD_TRACE_SAMPLE_RATIO", defaults.trace_sample_ratio),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()
