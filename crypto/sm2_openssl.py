"""SM2 signature checks by the system's OpenSSL 3 (libcrypto), about twice as fast as gmalglib's.

Every SM2 scan pays one verification, and gmalglib's (docs/national-crypto.md) is what made an SM2
scan cost three times an Ed25519 one. OpenSSL 3 has SM2 with assembly field arithmetic, but the
`cryptography` package does not expose it, so this module calls the system's libcrypto through
ctypes, for verification only (signing stays with gmalglib, the fastest signer measured).

Per key, once: the public point becomes an EVP_PKEY (a SubjectPublicKeyInfo with the SM2 curve's
OID, 1.2.156.10197.1.301), ZA = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA) is computed
(GB/T 32918.2 §5.5) and a verification context is initialised. Per signature: e = SM3(ZA ‖ M),
the r ‖ s signature written as the DER ECDSA-Sig-Value OpenSSL reads, and one `EVP_PKEY_verify` of
e. The context is reused under a lock (one context is not safe to share between threads).

`load()` returns None where libcrypto 3 or its SM2 is missing (another system, a FIPS-only build):
crypto/sm.py then keeps gmalglib. `ECARD_SM2_VERIFIER=gmalglib` forces that choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_long, c_size_t, c_void_p
from typing import Any

# GB/T 32918.5 curve parameters a, b and the base point G.
_A = bytes.fromhex("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC")
_B = bytes.fromhex("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93")
_GX = bytes.fromhex("32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7")
_GY = bytes.fromhex("BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0")
# SEQUENCE { SEQUENCE { id-ecPublicKey, sm2 (1.2.156.10197.1.301) }, BIT STRING (65 bytes) }, before the point.
_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d034200")


def za(signer_id: bytes, public: bytes) -> bytes:
    """ZA of GB/T 32918.2 §5.5 for a signer ID and an uncompressed public point 04 ‖ x ‖ y."""
    entl = (len(signer_id) * 8).to_bytes(2, "big")
    return hashlib.new("sm3", entl + signer_id + _A + _B + _GX + _GY + public[1:33] + public[33:65]).digest()


def der_signature(signature: bytes) -> bytes:
    """The 64-byte r ‖ s as DER `SEQUENCE { INTEGER r, INTEGER s }` (each at most 33 bytes: short lengths)."""

    def integer(value: bytes) -> bytes:
        value = value.lstrip(b"\x00") or b"\x00"
        if value[0] & 0x80:
            value = b"\x00" + value
        return b"\x02" + bytes((len(value),)) + value

    body = integer(signature[:32]) + integer(signature[32:])
    return b"\x30" + bytes((len(body),)) + body


class _Libcrypto:
    """The few libcrypto 3 functions used, with their C signatures declared (wrong ones would crash)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.d2i_PUBKEY = lib.d2i_PUBKEY
        self.d2i_PUBKEY.restype = c_void_p
        self.d2i_PUBKEY.argtypes = [c_void_p, POINTER(c_char_p), c_long]
        self.EVP_PKEY_free = lib.EVP_PKEY_free
        self.EVP_PKEY_free.restype = None
        self.EVP_PKEY_free.argtypes = [c_void_p]
        self.EVP_PKEY_is_a = lib.EVP_PKEY_is_a
        self.EVP_PKEY_is_a.restype = c_int
        self.EVP_PKEY_is_a.argtypes = [c_void_p, c_char_p]
        self.EVP_PKEY_CTX_new = lib.EVP_PKEY_CTX_new
        self.EVP_PKEY_CTX_new.restype = c_void_p
        self.EVP_PKEY_CTX_new.argtypes = [c_void_p, c_void_p]
        self.EVP_PKEY_CTX_free = lib.EVP_PKEY_CTX_free
        self.EVP_PKEY_CTX_free.restype = None
        self.EVP_PKEY_CTX_free.argtypes = [c_void_p]
        self.EVP_PKEY_verify_init = lib.EVP_PKEY_verify_init
        self.EVP_PKEY_verify_init.restype = c_int
        self.EVP_PKEY_verify_init.argtypes = [c_void_p]
        self.EVP_PKEY_verify = lib.EVP_PKEY_verify
        self.EVP_PKEY_verify.restype = c_int
        self.EVP_PKEY_verify.argtypes = [c_void_p, c_char_p, c_size_t, c_char_p, c_size_t]
        self.ERR_clear_error = lib.ERR_clear_error
        self.ERR_clear_error.restype = None
        self.ERR_clear_error.argtypes = []


class OpenSslSm2Verifier:
    """One SM2 public key's verifier over libcrypto: `verify(message, signature)` (gmalglib's order)."""

    __slots__ = ("_crypto", "_ctx", "_lock", "_pkey", "_za")

    def __init__(self, crypto: _Libcrypto, public: bytes, signer_id: bytes) -> None:
        self._crypto = crypto
        self._ctx: Any = None
        der = _SPKI_PREFIX + public
        cursor = c_char_p(der)
        self._pkey = crypto.d2i_PUBKEY(None, ctypes.byref(cursor), len(der))
        if not self._pkey or crypto.EVP_PKEY_is_a(self._pkey, b"SM2") != 1:
            crypto.ERR_clear_error()
            raise ValueError("libcrypto did not read the point as an SM2 public key")
        self._ctx = crypto.EVP_PKEY_CTX_new(self._pkey, None)
        if not self._ctx or crypto.EVP_PKEY_verify_init(self._ctx) != 1:
            crypto.ERR_clear_error()
            raise ValueError("libcrypto could not set up an SM2 verification")
        self._za = za(signer_id, public)
        self._lock = threading.Lock()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when signature (64 bytes, r ‖ s) is this key's signature of SM3(ZA ‖ message)."""
        digest = hashlib.new("sm3", self._za + message).digest()
        der = der_signature(signature)
        with self._lock:
            verified: bool = self._crypto.EVP_PKEY_verify(self._ctx, der, len(der), digest, len(digest)) == 1
            if not verified:
                self._crypto.ERR_clear_error()  # a refusal leaves an error on this thread's queue
        return verified

    def __del__(self) -> None:
        crypto = getattr(self, "_crypto", None)
        if crypto is None:
            return
        if getattr(self, "_ctx", None):
            crypto.EVP_PKEY_CTX_free(self._ctx)
        if getattr(self, "_pkey", None):
            crypto.EVP_PKEY_free(self._pkey)


def _load_libcrypto() -> _Libcrypto | None:
    if os.environ.get("ECARD_SM2_VERIFIER", "").lower() == "gmalglib":
        return None
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            if not hasattr(lib, "EVP_PKEY_is_a"):  # OpenSSL 1.1 has no EVP_PKEY_is_a, nor this SM2 API
                continue
            return _Libcrypto(lib)
        except OSError:
            continue
    return None


_LIBCRYPTO = _load_libcrypto()


def load(public: bytes, signer_id: bytes) -> OpenSslSm2Verifier | None:
    """An OpenSSL verifier of this key, or None where libcrypto 3's SM2 is not there (gmalglib then)."""
    if _LIBCRYPTO is None:
        return None
    try:
        return OpenSslSm2Verifier(_LIBCRYPTO, public, signer_id)
    except ValueError:
        return None


def available() -> bool:
    """Whether SM2 signatures are checked by libcrypto in this process."""
    return _LIBCRYPTO is not None
