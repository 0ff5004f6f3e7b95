"""Where issuer private keys live: in software (encrypted rows) or in a PKCS#11 token, key by key.

Every stored key says where its private half is (`issuer_keys.key_store`): "software" keys are
decrypted at start-up, as before; "pkcs11" keys stay in the token and sign there (crypto/hsm.py).
Both come out as `crypto.keys.PrivateKey`, so nothing that signs asks which it has.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from app.db.models import IssuerKey
from app.settings import Settings
from crypto import algorithms
from crypto.hsm import HsmConfigurationError, Pkcs11Config, Pkcs11SigningKey, Pkcs11Token, VendorMechanisms
from crypto.keys import PrivateKey, SigningUnavailable

logger = logging.getLogger(__name__)

SOFTWARE = "software"
PKCS11 = "pkcs11"
KEY_STORES = (SOFTWARE, PKCS11)
SEAL_SECRET_LENGTH = 32


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated issuer key and what its row keeps: the secret to encrypt and the token reference."""

    key: PrivateKey
    store: str
    secret: bytes
    token: str | None = None
    label: str | None = None


class IssuerKeyStore:
    """Makes and opens issuer keys: software ones in process, module ones through the configured token."""

    def __init__(self, token: Pkcs11Token | None = None, default: str = SOFTWARE) -> None:
        if default == PKCS11 and token is None:
            raise HsmConfigurationError("new issuer keys are to go in a PKCS#11 token, but none is configured")
        self.token = token
        self.default = default

    def generate(self, algorithm: str, region: str, store: str | None = None) -> NewKey:
        """A new key of the algorithm for region, in the named store (default: the deployment's)."""
        store = store or self.default
        if store not in KEY_STORES:
            raise ValueError(f"unknown issuer key store {store!r}; known: {', '.join(KEY_STORES)}")
        if store == SOFTWARE:
            key = algorithms.generate(algorithm)
            return NewKey(key, SOFTWARE, algorithms.secret_of(key))
        if self.token is None:
            raise HsmConfigurationError("no PKCS#11 token is configured (ECARD_PKCS11_MODULE, ECARD_PKCS11_TOKEN)")
        module_key = self.token.generate(algorithm, region)
        # The seal secret is the one secret such a key has outside the token (IssuerKey's docstring).
        return NewKey(module_key, PKCS11, os.urandom(SEAL_SECRET_LENGTH), self.token.label, module_key.label)

    def signing_key(self, row: IssuerKey, secret: bytes) -> PrivateKey:
        """The signer of a stored key (`secret`: its decrypted column). A module key is found in the token
        on its first signature (`check` finds it now); `SigningUnavailable` when its token is not the one
        this process opened (or none is)."""
        if row.key_store == SOFTWARE:
            return algorithms.private_key(row.algorithm, secret)
        if row.key_store != PKCS11 or not row.key_label:
            raise ValueError(f"issuer key {row.kid.hex()}: unknown key store {row.key_store!r}")
        if self.token is None or row.key_token != self.token.label:
            raise SigningUnavailable(
                f"issuer key {row.kid.hex()} of region {row.region_code} is in the PKCS#11 token {row.key_token!r}, "
                "which ECARD_PKCS11_MODULE / ECARD_PKCS11_TOKEN do not open"
            )
        return self.token.key(row.algorithm, row.region_code, row.public_key, row.key_label)

    def check(self, keys: list[PrivateKey]) -> None:
        """At start-up: every module key that is to sign is in the token as the database says, or
        `HsmConfigurationError` (the service does not start)."""
        for key in keys:
            if isinstance(key, Pkcs11SigningKey) and self.token is not None:
                self.token.check(key)

    def close(self) -> None:
        """Log out of the token, if one is open."""
        if self.token is not None:
            self.token.close()


SOFTWARE_KEYS = IssuerKeyStore()


def _pin(settings: Settings) -> str:
    if settings.pkcs11_pin_file:
        path = Path(settings.pkcs11_pin_file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise HsmConfigurationError(f"ECARD_PKCS11_PIN_FILE={path}: {exc.strerror}") from None
    if settings.pkcs11_pin:
        return settings.pkcs11_pin
    raise HsmConfigurationError("ECARD_PKCS11_MODULE is set: give the token's user PIN in ECARD_PKCS11_PIN_FILE")


def open_key_store(settings: Settings) -> IssuerKeyStore:
    """The deployment's key store: with the PKCS#11 token logged in when ECARD_PKCS11_MODULE is set.

    Raises `HsmConfigurationError` (module missing, no such token, PIN refused), so start-up stops there.
    """
    if not settings.pkcs11_module:
        return IssuerKeyStore(None, settings.issuer_key_store)
    try:
        sm2 = VendorMechanisms.parse(settings.pkcs11_sm2) if settings.pkcs11_sm2 else None
    except ValueError as exc:
        raise HsmConfigurationError(f"ECARD_PKCS11_SM2: {exc}") from None
    config = Pkcs11Config(Path(settings.pkcs11_module), settings.pkcs11_token, _pin(settings), sm2)
    token = Pkcs11Token.open(config)
    logger.info("issuer keys: PKCS#11 token %r opened through %s", config.token_label, config.module)
    return IssuerKeyStore(token, settings.issuer_key_store)
