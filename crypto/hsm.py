"""Issuer keys held in a PKCS#11 token (an HSM, a certified cryptographic module, SoftHSM in the tests).

The private key is generated in the token (C_GenerateKeyPair, CKA_SENSITIVE true, CKA_EXTRACTABLE
false) and never leaves it: the service keeps the public key (read back from CKA_EC_POINT), the kid
computed from it, and a reference to the token object: its CKA_LABEL and CKA_ID (the kid). Signing
is C_SignInit + C_Sign on the key's handle; `Pkcs11SigningKey` satisfies `crypto.keys.PrivateKey`,
so the credential, status-list and kit code sign with it as with a software key.

Mechanisms: Ed25519 is standard PKCS#11 3.0 (CKK_EC_EDWARDS, CKM_EC_EDWARDS_KEY_PAIR_GEN,
CKM_EDDSA, curve named by its OID 1.3.101.112). PKCS#11 registers nothing for SM2: modules that
have it name it by CKM_VENDOR_DEFINED values of their own (key type, key-pair generation and
SM2-with-SM3 signing over the message with the default signer ID), so a deployment names them
(`VendorMechanisms`); without them SM2 keys cannot be put in the token.

Threads: python-pkcs11 releases the GIL during C_Sign, and a session runs one operation at a
time, so `sign` serialises on the token's lock; callers on an event loop call it from a thread
(`blocking`). When the token fails (its session closed, the device gone), `sign` raises
`SigningUnavailable` and drops the session; the next call logs in again.

python-pkcs11 is optional (`pip install ecard[hsm]`): it is imported only when a token is opened.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from crypto.keys import ALG_EDDSA, ALG_SM2_SM3, PublicKey, SigningUnavailable, VerifyKey, kid_for
from crypto.sm import DEFAULT_SIGNER_ID, Sm2VerifyKey, sm2_kid

if TYPE_CHECKING:
    import pkcs11

ED25519_OID = "1.3.101.112"  # id-Ed25519, RFC 8410
SM2_OID = "1.2.156.10197.1.301"  # the SM2 curve, GM/T 0006
LABEL_PREFIX = "ecard-issuer"
# After a failure, the next login is tried no sooner than this (a dead device is not hammered).
RECONNECT_INTERVAL = 1.0

E = TypeVar("E")
# python-pkcs11 errors that are the request's fault (a mechanism or template the module refuses, no such
# key): the session stays. Any other PKCS#11 error means the session or the device is gone.
_REQUEST_ERRORS = (
    "NoSuchKey", "MultipleObjectsReturned", "MechanismInvalid", "MechanismParamInvalid", "KeyTypeInconsistent",
    "TemplateIncomplete", "TemplateInconsistent", "AttributeTypeInvalid",
    "AttributeValueInvalid", "AttributeReadOnly", "DataLenRange", "DataInvalid", "DomainParamsInvalid",
    "ArgumentsBad", "FunctionNotSupported",
)  # fmt: skip


class HsmConfigurationError(RuntimeError):
    """The module, token, PIN or a key in it is not as configured: the service must not start."""


@dataclass(frozen=True, slots=True)
class VendorMechanisms:
    """A module's own values for SM2: key type, key-pair generation, SM2-with-SM3 signing (CKM_VENDOR_DEFINED…)."""

    key_type: int
    generate: int
    sign: int

    @classmethod
    def parse(cls, text: str) -> VendorMechanisms:
        """`key_type=0x…,generate=0x…,sign=0x…` (hexadecimal or decimal), as ECARD_PKCS11_SM2 spells it."""
        values: dict[str, int] = {}
        for item in text.split(","):
            name, _, raw = item.partition("=")
            try:
                values[name.strip()] = int(raw.strip(), 0)
            except ValueError:
                raise ValueError(f"SM2 vendor mechanisms: {item.strip()!r} is not name=number") from None
        missing = {"key_type", "generate", "sign"} - values.keys()
        if missing or len(values) != 3:
            raise ValueError("SM2 vendor mechanisms are key_type=…,generate=…,sign=… (CKK_/CKM_VENDOR_DEFINED values)")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the token is and how to log in to it (the PIN is never printed)."""

    module: Path
    token_label: str
    pin: str = field(repr=False)
    sm2: VendorMechanisms | None = None


def _enum_member(enum: Any, value: int) -> Any:
    """The member of python-pkcs11's IntEnum for value; for a vendor value it has none, so a bare member is
    made (python-pkcs11 0.10 takes only members, and passes the integer on to the module unchanged)."""
    try:
        return enum(value)
    except ValueError:
        member = int.__new__(enum, value)
        member._name_ = f"VENDOR_{value:#x}"
        member._value_ = value
        return member


def _raw_point(point: bytes, length: int) -> bytes:
    """CKA_EC_POINT as modules give it (DER OCTET STRING, or bare) → the raw public key of length bytes."""
    if len(point) == length + 2 and point[0] == 0x04 and point[1] == length:
        return point[2:]
    if len(point) == length:
        return point
    raise HsmConfigurationError(f"the token's public key has an unexpected form ({len(point)} bytes)")


def _raw_signature(signature: bytes) -> bytes:
    """r ‖ s (64 bytes) from a module's signature, which some SM2 mechanisms give DER-encoded."""
    if len(signature) == 64:
        return signature
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        raise SigningUnavailable(f"the module returned a {len(signature)}-byte signature, not r ‖ s") from None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class Pkcs11Token:
    """The process's logged-in session with one token; finds, generates and signs with issuer keys.

    PKCS#11 logs in per application, not per session: a second C_Login is refused and a C_Logout ends
    every session's login. So a process has one `Pkcs11Token` per module and token label: `open` hands
    out the one already open (after checking the PIN given is the one it logged in with), and the last
    `close` logs out.
    """

    _open: ClassVar[dict[tuple[str, str], Pkcs11Token]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._token: Any = None
        self._session: Any = None
        self._handles: dict[tuple[str, bytes], Any] = {}
        self._failed_at = 0.0
        self._users = 0

    @classmethod
    def open(cls, config: Pkcs11Config) -> Pkcs11Token:
        """Load the module, find the token and log in; `HsmConfigurationError` saying which step failed."""
        import hmac

        place = (str(config.module.resolve()), config.token_label)
        with cls._registry_lock:
            token = cls._open.get(place)
            if token is not None:
                if not hmac.compare_digest(token.config.pin.encode(), config.pin.encode()):
                    raise HsmConfigurationError(
                        f"the token {config.token_label!r} refused the PIN (ECARD_PKCS11_PIN_FILE / ECARD_PKCS11_PIN)"
                    )
            else:
                token = cls(config)
                with token._lock:
                    token._login()
                cls._open[place] = token
            token._users += 1
            return token

    @property
    def label(self) -> str:
        """The token's label (CKA_LABEL of its slot's token)."""
        return self.config.token_label

    def _login(self) -> None:
        try:
            import pkcs11
        except ImportError:
            raise HsmConfigurationError(
                "ECARD_PKCS11_MODULE is set but python-pkcs11 is not installed (pip install 'ecard[hsm]')"
            ) from None
        module = self.config.module
        if not module.is_file():
            raise HsmConfigurationError(f"ECARD_PKCS11_MODULE={module}: no such file (the vendor's PKCS#11 library)")
        try:
            library = pkcs11.lib(str(module))
        except pkcs11.PKCS11Error as exc:
            raise HsmConfigurationError(f"ECARD_PKCS11_MODULE={module} could not be loaded: {exc!r}") from None
        try:
            self._token = library.get_token(token_label=self.config.token_label)
        except pkcs11.NoSuchToken:
            raise HsmConfigurationError(
                f"the PKCS#11 module {module} has no token labelled {self.config.token_label!r} (ECARD_PKCS11_TOKEN)"
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise HsmConfigurationError(f"more than one token is labelled {self.config.token_label!r}") from None
        try:
            self._session = self._token.open(user_pin=self.config.pin, rw=True)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise HsmConfigurationError(
                f"the token {self.config.token_label!r} refused the PIN (ECARD_PKCS11_PIN_FILE / ECARD_PKCS11_PIN)"
            ) from None
        except pkcs11.PinLocked:
            raise HsmConfigurationError(f"the token {self.config.token_label!r} has locked its user PIN") from None
        except pkcs11.PKCS11Error as exc:
            raise HsmConfigurationError(
                f"logging in to the token {self.config.token_label!r} failed: {type(exc).__name__}"
            ) from None
        self._handles.clear()

    def close(self) -> None:
        """Give the token back; the last user logs out and closes the session."""
        with self._registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._open.pop((str(self.config.module.resolve()), self.config.token_label), None)
        with self._lock:
            session, self._session = self._session, None
            self._handles.clear()
        if session is not None:
            import pkcs11

            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()

    def _private(self, label: str, kid: bytes) -> Any:
        """The private key object with this label and CKA_ID (lock held, session open)."""
        handle = self._handles.get((label, kid))
        if handle is None:
            from pkcs11 import ObjectClass

            handle = self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid, label=label)
            self._handles[(label, kid)] = handle
        return handle

    def _with_session(self, work: Callable[[], E]) -> E:
        """Run work under the lock with a live session, logging in again after a failure (at most once a second)."""
        import pkcs11

        with self._lock:
            if self._session is None:
                if time.monotonic() - self._failed_at < RECONNECT_INTERVAL:
                    raise SigningUnavailable(f"the token {self.label!r} failed a moment ago; retrying shortly")
                try:
                    self._login()
                except HsmConfigurationError as exc:
                    self._failed_at = time.monotonic()
                    raise SigningUnavailable(str(exc)) from None
            try:
                return work()
            except pkcs11.PKCS11Error as exc:
                if type(exc).__name__ in _REQUEST_ERRORS:
                    raise
                # The session (or the device) is gone: drop it; the next call logs in again.
                self._session = None
                self._handles.clear()
                self._failed_at = time.monotonic()
                raise SigningUnavailable(f"the token {self.label!r} failed: {type(exc).__name__}") from None

    def sign(self, label: str, kid: bytes, mechanism: int, message: bytes) -> bytes:
        """C_Sign of message with the key (label, CKA_ID kid); `SigningUnavailable` when the token fails."""
        import pkcs11
        from pkcs11 import Mechanism

        sign_mechanism = _enum_member(Mechanism, mechanism)
        try:
            signature = self._with_session(
                lambda: bytes(self._private(label, kid).sign(message, mechanism=sign_mechanism))
            )
        except pkcs11.NoSuchKey:
            raise SigningUnavailable(f"the token {self.label!r} has no key {label!r}") from None
        except pkcs11.PKCS11Error as exc:
            raise SigningUnavailable(f"the token {self.label!r} refused to sign: {type(exc).__name__}") from None
        return _raw_signature(signature)

    def check(self, key: Pkcs11SigningKey) -> None:
        """Find the key now and check it is what the database says: the same public key, not extractable,
        sensitive, able to sign. `HsmConfigurationError` otherwise (a start-up check)."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        def read() -> tuple[bytes, bool, bool, bool]:
            private = self._private(key.label, key.kid)
            public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key.kid, label=key.label)
            return (
                bytes(public[Attribute.EC_POINT]),
                bool(private[Attribute.EXTRACTABLE]),
                bool(private[Attribute.SENSITIVE]),
                bool(private[Attribute.SIGN]),
            )

        try:
            point, extractable, sensitive, can_sign = self._with_session(read)
        except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
            found = "no" if isinstance(exc, pkcs11.NoSuchKey) else "more than one"
            raise HsmConfigurationError(
                f"issuer key {key.kid.hex()} ({key.region}): the token {self.label!r} has {found} key pair labelled "
                f"{key.label!r} with that CKA_ID"
            ) from None
        except SigningUnavailable as exc:
            raise HsmConfigurationError(str(exc)) from None
        if _raw_point(point, len(key.public)) != key.public:
            raise HsmConfigurationError(
                f"issuer key {key.kid.hex()} ({key.region}): the token's key {key.label!r} is another key than the "
                "database's public key"
            )
        if extractable or not sensitive or not can_sign:
            raise HsmConfigurationError(
                f"issuer key {key.kid.hex()} ({key.region}): the token's key {key.label!r} must be CKA_SENSITIVE, "
                "not CKA_EXTRACTABLE, and CKA_SIGN"
            )

    def generate(self, algorithm: str, region: str) -> Pkcs11SigningKey:
        """A new key pair of the algorithm ("Ed25519", "SM2") generated in the token for region.

        It is generated under a temporary CKA_ID, then given its kid as CKA_ID and the label
        `ecard-issuer-<region>-<kid hex>` (both objects), so the token's objects name the published key.
        """
        import os

        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.util.ec import encode_named_curve_parameters

        if algorithm == "SM2":
            if self.config.sm2 is None:
                raise HsmConfigurationError(
                    "SM2 keys in the token need the module's vendor mechanisms "
                    "(ECARD_PKCS11_SM2=key_type=…,generate=…,sign=…)"
                )
            key_type = _enum_member(KeyType, self.config.sm2.key_type)
            mechanism = _enum_member(Mechanism, self.config.sm2.generate)
            curve = SM2_OID
        elif algorithm == "Ed25519":
            key_type, mechanism, curve = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, ED25519_OID
        else:
            raise ValueError(f"no PKCS#11 issuer keys of algorithm {algorithm!r}")
        temporary = os.urandom(8)
        pending = f"{LABEL_PREFIX}-{region}-pending-{temporary.hex()}"

        def generate() -> Pkcs11SigningKey:
            public, private = self._session.generate_keypair(
                key_type,
                mechanism=mechanism,
                store=True,
                id=temporary,
                label=pending,
                public_template={
                    Attribute.EC_PARAMS: encode_named_curve_parameters(curve),
                    Attribute.VERIFY: True,
                    Attribute.KEY_TYPE: key_type,
                },
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.SIGN: True,
                    Attribute.KEY_TYPE: key_type,
                },
            )
            try:
                key_class = Pkcs11Sm2Key if algorithm == "SM2" else Pkcs11Ed25519Key
                raw = _raw_point(bytes(public[Attribute.EC_POINT]), key_class.PUBLIC_LENGTH)
                key = key_class(token=self, region=region, public=raw, label="")
                label = f"{LABEL_PREFIX}-{region}-{key.kid.hex()}"
                for item in (public, private):
                    item[Attribute.ID] = key.kid
                    item[Attribute.LABEL] = label
            except BaseException:
                for item in (public, private):
                    with contextlib.suppress(pkcs11.PKCS11Error):
                        item.destroy()
                raise
            self._handles[(label, key.kid)] = private
            return key_class(token=self, region=region, public=raw, label=label)

        try:
            return self._with_session(generate)
        except SigningUnavailable as exc:
            raise HsmConfigurationError(f"generating a key in the token failed: {exc}") from None
        except pkcs11.PKCS11Error as exc:
            raise HsmConfigurationError(
                f"the token refused to generate an {algorithm} key: {type(exc).__name__}"
            ) from None

    def key(self, algorithm: str, region: str, public: bytes, label: str) -> Pkcs11SigningKey:
        """The stored key's signer; the token is asked for it on the first signature (`check` asks now)."""
        if algorithm == "SM2":
            return Pkcs11Sm2Key(token=self, region=region, public=public, label=label)
        if algorithm == "Ed25519":
            return Pkcs11Ed25519Key(token=self, region=region, public=public, label=label)
        raise ValueError(f"no PKCS#11 issuer keys of algorithm {algorithm!r}")

    def session_for_tests(self) -> pkcs11.Session:
        """The open session (tests close it to play a token failure)."""
        session: pkcs11.Session = self._session
        return session


@dataclass(frozen=True, slots=True, eq=False)
class Pkcs11SigningKey:
    """An issuer key in the token: public key, kid and the token object's label; signs through the token."""

    PUBLIC_LENGTH: ClassVar[int] = 32
    alg: ClassVar[int]
    blocking: ClassVar[bool] = True
    token: Pkcs11Token = field(repr=False)
    region: str
    public: bytes
    label: str
    kid: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.public) != self.PUBLIC_LENGTH:
            raise ValueError(f"this key's public key has {self.PUBLIC_LENGTH} bytes")
        object.__setattr__(self, "kid", self._kid())

    def _kid(self) -> bytes:
        raise NotImplementedError

    def _mechanism(self) -> int:
        raise NotImplementedError

    def sign(self, message: bytes) -> bytes:
        """The token's signature r ‖ s (64 bytes) of message; `SigningUnavailable` when the token fails."""
        return self.token.sign(self.label, self.kid, self._mechanism(), message)

    def verify_key(self, region: str) -> PublicKey:
        """The public half, for verification (no token needed)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True, eq=False)
class Pkcs11Ed25519Key(Pkcs11SigningKey):
    """An Ed25519 issuer key in the token (CKM_EDDSA, pure Ed25519 over the message)."""

    alg: ClassVar[int] = ALG_EDDSA

    def _kid(self) -> bytes:
        return kid_for(self.public)

    def _mechanism(self) -> int:
        return 0x1057  # CKM_EDDSA (PKCS#11 3.0)

    def verify_key(self, region: str) -> VerifyKey:
        """The public half, for verification (no token needed)."""
        return VerifyKey(public=self.public, region=region)


@dataclass(frozen=True, slots=True, eq=False)
class Pkcs11Sm2Key(Pkcs11SigningKey):
    """An SM2 issuer key in the token, signing with the module's vendor SM2-with-SM3 mechanism (default signer ID)."""

    PUBLIC_LENGTH: ClassVar[int] = 65
    alg: ClassVar[int] = ALG_SM2_SM3

    def _kid(self) -> bytes:
        return sm2_kid(self.public)

    def _mechanism(self) -> int:
        sm2 = self.token.config.sm2
        if sm2 is None:
            raise SigningUnavailable("SM2 signing in the token needs ECARD_PKCS11_SM2 (the module's vendor mechanisms)")
        return sm2.sign

    def verify_key(self, region: str) -> Sm2VerifyKey:
        """The public half, for verification (no token needed)."""
        return Sm2VerifyKey(public=self.public, region=region, signer_id=DEFAULT_SIGNER_ID)
