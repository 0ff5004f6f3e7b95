"""Compare the SM2/SM3/SM4 libraries on PyPI: standard vectors, cross-checks and speed beside Ed25519.

    python -m loadtests.national_crypto_bench [--seconds 0.4] [--only LABEL ...]

Every library that is importable is checked and timed; the others are reported as not installed
(the project installs only the chosen one and the independent checker; docs/national-crypto.md says
how the full comparison was run). Checks, each through the library's own API:

- SM3 of "abc" and of "abcd" x 16 (GB/T 32905-2016 appendix A);
- SM4 of the GB/T 32907-2016 example block, and the same block encrypted 1,000,000 times (C libraries
  only: done as one CBC encryption under a zero IV of the block followed by 999,999 zero blocks,
  since C_i = E(C_{i-1} xor 0));
- SM4-GCM against the RFC 8998 appendix A.1 vector, where the library has GCM;
- SM2: verification of the GM/T 0003.5-2012 known answer on the recommended curve (private key
  3945208F…, message "message digest", ID "1234567812345678"), a flipped signature refused, and
  cross-verification with the pure-Python `gmssl` both ways, with the default and with another
  signer ID (GM/T 0009 ZA).

Then µs per operation: SM2 sign and verify (message of 200 bytes), SM3 of 200 bytes, SM4-GCM of
64 bytes, beside Ed25519 sign and verify through PyNaCl (libsodium) and `cryptography` (OpenSSL).
The machine's load average is printed with the figures. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

DEFAULT_ID = b"1234567812345678"
OTHER_ID = b"ALICE123@YAHOO.COM"
MESSAGE = bytes(range(200))

# SM2 recommended curve (GM/T 0003.5-2012 / GB/T 32918.5-2017).
SM2_P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
SM2_A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
SM2_B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
SM2_GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
SM2_GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0

# GM/T 0003.5-2012 example on the recommended curve (the same numbers are in GmSSL's and gmalglib's tests).
KAT_PRIVATE = bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8")
KAT_PUBLIC = bytes.fromhex(
    "04"
    "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
    "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
)
KAT_MESSAGE = b"message digest"
KAT_DIGEST = bytes.fromhex("F0B43E94BA45ACCAACE692ED534382EB17E6AB5A19CE7B31F4486FDFC0D28640")
KAT_SIGNATURE = bytes.fromhex(
    "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
    "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"
)

SM3_VECTORS = {
    b"abc": "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
    b"abcd" * 16: "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732",
}
SM4_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
SM4_ONCE = "681edf34d206965e86b3e94f536e4246"
SM4_MILLION = "595298c7c6fd271f0402f804c33d3f66"
# RFC 8998 appendix A.1 (SM4-GCM).
GCM_KEY = SM4_KEY
GCM_NONCE = bytes.fromhex("00001234567800000000ABCD")
GCM_AAD = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
GCM_PLAIN = bytes.fromhex(
    "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
    "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
)
GCM_SEALED = bytes.fromhex(
    "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
    "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    "83DE3541E4C2B58177E065A9BF7B62EC"
)

Signer = Callable[[bytes, bytes, bytes, bytes], bytes]  # (private, public65, message, signer_id) → r‖s
Verifier = Callable[[bytes, bytes, bytes, bytes], bool]  # (public65, message, r‖s, signer_id) → valid


def raw_from_der(der: bytes) -> bytes:
    """r‖s (64 bytes) from a DER SEQUENCE of two INTEGERs."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def der_from_raw(raw: bytes) -> bytes:
    """DER SEQUENCE of two INTEGERs from r‖s."""
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def za_prefix(public65: bytes, signer_id: bytes) -> bytes:
    """The GM/T 0009 input to ZA: ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA."""
    curve = b"".join(v.to_bytes(32, "big") for v in (SM2_A, SM2_B, SM2_GX, SM2_GY))
    return (len(signer_id) * 8).to_bytes(2, "big") + signer_id + curve + public65[1:]


@dataclass
class Library:
    """One candidate: what it offers, each operation as a plain function over bytes."""

    label: str
    distribution: str
    module: str
    sm3: Callable[[bytes], bytes] | None = None
    sm4_block: Callable[[bytes, bytes], bytes] | None = None
    sm4_chain: Callable[[bytes, bytes, int], bytes] | None = None  # (key, block, n) → E^n(block)
    sm4_gcm: Callable[[bytes, bytes, bytes, bytes], bytes] | None = None  # (key, nonce, plain, aad) → ct‖tag
    sm2_keypair: Callable[[], tuple[bytes, bytes]] | None = None
    sm2_sign: Signer | None = None
    sm2_verify: Verifier | None = None
    signer_id: str = ""
    gcm_timing_only: Callable[[bytes, bytes, bytes, bytes], bytes] | None = None
    notes: list[str] = field(default_factory=list)


def _chain_via_cbc(cbc: Callable[[bytes, bytes, bytes], bytes]) -> Callable[[bytes, bytes, int], bytes]:
    def chain(key: bytes, block: bytes, count: int) -> bytes:
        out = cbc(key, bytes(16), block + bytes(16 * (count - 1)))
        return out[16 * (count - 1) : 16 * count]

    return chain


def lib_cryptography() -> Library:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    def sm3(data: bytes) -> bytes:
        digest = hashes.Hash(hashes.SM3())
        digest.update(data)
        return digest.finalize()

    def block(key: bytes, data: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
        return enc.update(data) + enc.finalize()

    def cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def gcm(key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(plain) + enc.finalize() + enc.tag

    return Library(
        "cryptography",
        "cryptography",
        "cryptography",
        sm3=sm3,
        sm4_block=block,
        sm4_chain=_chain_via_cbc(cbc),
        sm4_gcm=gcm,
        notes=["no SM2 (OpenSSL's SM2 is not exposed)"],
    )


def lib_gmssl_pyx() -> Library:
    import gmssl_pyx as g

    def keypair() -> tuple[bytes, bytes]:
        public, private = g.sm2_key_generate()
        return private, b"\x04" + public

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        return raw_from_der(g.sm2_sign(private, public[1:], message, signer_id))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        return bool(g.sm2_verify(public[1:], message, der_from_raw(signature), signer_id))

    def gcm(key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        ciphertext, tag = g.sm4_gcm_encrypt(key, nonce, aad, plain)
        return bytes(ciphertext) + bytes(tag)

    def block(key: bytes, data: bytes) -> bytes:
        return bytes(g.sm4_cbc_padding_encrypt(key, bytes(16), data))[:16]

    return Library(
        "gmssl-pyx",
        "gmssl-pyx",
        "gmssl_pyx",
        sm3=g.sm3_hash,
        sm4_block=block,
        sm4_chain=_chain_via_cbc(g.sm4_cbc_padding_encrypt),
        sm4_gcm=gcm,
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="argument; DER signatures",
        notes=["no public key from a private key"],
    )


def lib_gmalglib() -> Library:
    from gmalglib import sm2 as gsm2
    from gmalglib import sm3 as gsm3
    from gmalglib import sm4 as gsm4

    def keypair() -> tuple[bytes, bytes]:
        private, public = gsm2.SM2().generate_keypair()
        return bytes(private), bytes(public)

    @functools.cache
    def signer(private: bytes, public: bytes, signer_id: bytes) -> Any:
        return gsm2.SM2(sk=private, pk=public, uid=signer_id)

    @functools.cache
    def verifier(public: bytes, signer_id: bytes) -> Any:
        return gsm2.SM2(pk=public, uid=signer_id)

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        return bytes(signer(private, public, signer_id).sign(message))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        return bool(verifier(public, signer_id).verify(message, signature))

    def chain(key: bytes, data: bytes, count: int) -> bytes:
        cipher = gsm4.SM4(key)
        for _ in range(count):
            data = cipher.encrypt(data)
        return bytes(data)

    return Library(
        "gmalglib",
        "gmalglib",
        "gmalglib",
        sm3=lambda data: bytes(gsm3.SM3(data).digest()),
        sm4_block=lambda key, data: bytes(gsm4.SM4(key).encrypt(data)),
        sm4_chain=chain,
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="argument (uid); raw r‖s",
        notes=["SM4 single blocks only (no mode, no GCM)"],
    )


def lib_tongsuopy() -> Library:
    from tongsuopy.crypto import hashes
    from tongsuopy.crypto.asymciphers import ec
    from tongsuopy.crypto.ciphers import Cipher, algorithms, modes

    def sm3(data: bytes) -> bytes:
        digest = hashes.Hash(hashes.SM3())
        digest.update(data)
        return digest.finalize()

    def block(key: bytes, data: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
        return enc.update(data) + enc.finalize()

    def cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def gcm(key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(plain) + enc.finalize() + enc.tag

    def keypair() -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SM2())
        numbers = key.private_numbers()
        x, y = numbers.public_numbers.x, numbers.public_numbers.y
        return numbers.private_value.to_bytes(32, "big"), b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")

    @functools.cache
    def private_key(private: bytes) -> Any:
        return ec.derive_private_key(int.from_bytes(private, "big"), ec.SM2())

    @functools.cache
    def public_key(public: bytes) -> Any:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SM2(), public)

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        if signer_id != DEFAULT_ID:
            raise NotImplementedError("no signer ID argument")
        return raw_from_der(private_key(private).sign(message, ec.ECDSA(hashes.SM3())))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        if signer_id != DEFAULT_ID:
            raise NotImplementedError("no signer ID argument")
        key = public_key(public)
        try:
            key.verify(der_from_raw(signature), message, ec.ECDSA(hashes.SM3()))
        except Exception:
            return False
        return True

    return Library(
        "tongsuopy",
        "tongsuopy",
        "tongsuopy",
        sm3=sm3,
        sm4_block=block,
        sm4_chain=_chain_via_cbc(cbc),
        sm4_gcm=gcm,
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="fixed default ID; DER signatures",
    )


def lib_gmssl_fast() -> Library:
    import gmssl_fast as g
    from gmssl_fast import _core

    @functools.cache
    def fast_signer(private: bytes, public: bytes) -> Any:
        return g.SM2(private.hex(), public.hex())

    @functools.cache
    def fast_verifier(public: bytes) -> Any:
        return g.SM2(public_key=public.hex())

    def keypair() -> tuple[bytes, bytes]:
        pair = g.SM2.generate()
        private, public = pair.private_key_hex or "", pair.public_key_hex or ""
        return bytes.fromhex(private), bytes.fromhex(public if len(public) == 130 else "04" + public)

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        if signer_id != DEFAULT_ID:
            raise NotImplementedError("no signer ID argument")
        return bytes(fast_signer(private, public).sign(message))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        if signer_id != DEFAULT_ID:
            raise NotImplementedError("no signer ID argument")
        return bool(fast_verifier(public).verify(message, signature))

    def gcm(key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        ciphertext, tag = g.SM4GCM(key, nonce).encrypt(plain, aad)
        return bytes(ciphertext) + bytes(tag)

    return Library(
        "gmssl-fast",
        "gmssl-fast",
        "gmssl_fast",
        sm3=g.sm3,
        sm4_block=lambda key, data: bytes(_core.sm4_ecb_encrypt(key, data))[:16],
        sm4_chain=_chain_via_cbc(lambda key, iv, data: bytes(_core.sm4_cbc_encrypt(key, iv, data))),
        sm4_gcm=gcm,
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="fixed default ID; raw r‖s, hex keys",
    )


def lib_smcryptopy() -> Library:
    from smcryptopy import sm2 as s2
    from smcryptopy import sm3 as s3
    from smcryptopy import sm4 as s4

    def keypair() -> tuple[bytes, bytes]:
        private, public = s2.gen_keypair()
        return bytes.fromhex(private), bytes.fromhex(public if len(public) == 130 else "04" + public)

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        return raw_from_der(bytes(s2.sign(signer_id, message, private.hex())))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        # Only well-formed DER reaches it: a malformed one panics in Rust and aborts the process.
        return s2.verify(signer_id, message, der_from_raw(signature), public[1:].hex()) == 1

    return Library(
        "smcryptopy",
        "smcryptopy",
        "smcryptopy",
        sm3=lambda data: bytes.fromhex(s3.sm3_hash(data)),
        sm4_block=lambda key, data: bytes(s4.encrypt_ecb(data, key))[:16],
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="argument; DER signatures, hex keys",
        notes=["SM4 ECB only; aborts the process on a malformed DER signature"],
    )


def lib_gmssl() -> Library:
    from gmssl import func, sm2, sm3, sm4

    def digest(data: bytes) -> bytes:
        return bytes.fromhex(sm3.sm3_hash(func.bytes_to_list(data)))

    def e_value(public: bytes, message: bytes, signer_id: bytes) -> bytes:
        # gmssl hard-codes the default ID in sign_with_sm3; other IDs go through sign() on e.
        return digest(digest(za_prefix(public, signer_id)) + message)

    def crypt_sm2(private: bytes, public: bytes) -> Any:
        key = sm2.CryptSM2(private_key=private.hex(), public_key="")
        # Set after construction: the constructor's public_key.lstrip("04") mangles keys whose x begins 0x04.
        key.public_key = public[1:].hex()
        return key

    def keypair() -> tuple[bytes, bytes]:
        private = os.urandom(32)
        signer = sm2.CryptSM2(private_key=private.hex(), public_key="")
        public_hex = signer._kg(int(private.hex(), 16), sm2.default_ecc_table["g"])
        return private, b"\x04" + bytes.fromhex(public_hex)

    def sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
        signer = crypt_sm2(private, public)
        return bytes.fromhex(signer.sign(e_value(public, message, signer_id), func.random_hex(signer.para_len)))

    def verify(public: bytes, message: bytes, signature: bytes, signer_id: bytes) -> bool:
        verifier = crypt_sm2(b"", public)
        return bool(verifier.verify(signature.hex(), e_value(public, message, signer_id)))

    def block(key: bytes, data: bytes) -> bytes:
        cipher = sm4.CryptSM4(padding_mode=3)  # no padding
        cipher.set_key(key, sm4.SM4_ENCRYPT)
        return bytes(cipher.crypt_ecb(data))[:16]

    return Library(
        "gmssl (pure Python)",
        "gmssl",
        "gmssl",
        sm3=digest,
        sm4_block=block,
        sm2_keypair=keypair,
        sm2_sign=sign,
        sm2_verify=verify,
        signer_id="fixed default ID in sign_with_sm3 (other IDs: sign e yourself); raw r‖s hex",
        notes=["SM4 ECB/CBC only"],
    )


def lib_crypto_sm() -> Library:
    """This project's crypto/sm.py (gmalglib for SM2, cryptography for the rest), through its public API."""
    from crypto import sm

    def keypair() -> tuple[bytes, bytes]:
        key = sm.Sm2SigningKey.generate()
        return key.private, key.public

    @functools.cache
    def signer(private: bytes, signer_id: bytes) -> sm.Sm2SigningKey:
        return sm.Sm2SigningKey(private, signer_id)

    @functools.cache
    def verifier(public: bytes, signer_id: bytes) -> sm.Sm2VerifyKey:
        return sm.Sm2VerifyKey(public, "510000", signer_id)

    @functools.cache
    def aead(key: bytes) -> sm.Sm4GcmCipher:
        return sm.Sm4GcmCipher(key)

    def gcm(key: bytes, nonce: bytes, plain: bytes, aad: bytes) -> bytes:
        return aead(key).encrypt(plain, aad)  # its own random nonce: timed, not checked against RFC 8998

    return Library(
        "crypto.sm (ours)",
        "ecard",
        "crypto.sm",
        sm3=sm.sm3,
        sm4_block=sm.sm4_encrypt_block,
        sm2_keypair=keypair,
        sm2_sign=lambda private, public, message, signer_id: signer(private, signer_id).sign(message),
        sm2_verify=lambda public, message, signature, signer_id: verifier(public, signer_id).verify(signature, message),
        signer_id="argument; raw r‖s",
        gcm_timing_only=gcm,
    )


LIBRARIES: list[Callable[[], Library]] = [
    lib_crypto_sm,
    lib_cryptography,
    lib_gmssl_pyx,
    lib_gmalglib,
    lib_tongsuopy,
    lib_gmssl_fast,
    lib_smcryptopy,
    lib_gmssl,
]


def per_op_us(operation: Callable[[], object], seconds: float, rounds: int = 5) -> float:
    """µs per call: the best of `rounds` rounds sharing `seconds`, after a warm-up.

    The best round, not the mean: on a machine shared with other work, the slowest rounds
    measure the neighbours, and every operation here is measured the same way.
    """
    operation()
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        deadline = start + seconds / rounds
        batch = 1
        while True:
            for _ in range(batch):
                operation()
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
            batch = min(batch * 2, 256)
        best = min(best, (now - start) / calls * 1e6)
    return best


def check(name: str, run: Callable[[], bool]) -> str:
    """'ok', 'FAIL' or 'n/a: why' for one check."""
    try:
        return "ok" if run() else "FAIL"
    except NotImplementedError as exc:
        return f"n/a ({exc})"
    except Exception as exc:
        return f"FAIL ({type(exc).__name__}: {exc})"


def checks(lib: Library, reference: Library | None) -> dict[str, str]:
    """The standard vectors and cross-checks for one library."""
    results: dict[str, str] = {}
    if lib.sm3 is not None:
        sm3 = lib.sm3
        results["SM3 vectors"] = check("sm3", lambda: all(sm3(m).hex() == d for m, d in SM3_VECTORS.items()))
    if lib.sm4_block is not None:
        block = lib.sm4_block
        results["SM4 vector"] = check("sm4", lambda: block(SM4_KEY, SM4_KEY).hex() == SM4_ONCE)
    if lib.sm4_chain is not None:
        chain = lib.sm4_chain
        results["SM4 x 10^6"] = check("sm4m", lambda: chain(SM4_KEY, SM4_KEY, 1_000_000).hex() == SM4_MILLION)
    results["SM4-GCM RFC 8998"] = (
        check("gcm", lambda: gcm(GCM_KEY, GCM_NONCE, GCM_PLAIN, GCM_AAD) == GCM_SEALED)
        if (gcm := lib.sm4_gcm) is not None
        else "none"
    )
    if lib.sm2_sign is not None and lib.sm2_verify is not None and lib.sm2_keypair is not None:
        sign, verify, keypair = lib.sm2_sign, lib.sm2_verify, lib.sm2_keypair
        flipped = KAT_SIGNATURE[:-1] + bytes([KAT_SIGNATURE[-1] ^ 1])
        results["SM2 GM/T 0003.5 KAT"] = check(
            "kat",
            lambda: (
                verify(KAT_PUBLIC, KAT_MESSAGE, KAT_SIGNATURE, DEFAULT_ID)
                and not verify(KAT_PUBLIC, KAT_MESSAGE, flipped, DEFAULT_ID)
            ),
        )
        if reference is not None and reference.sm2_sign is not None and reference.sm2_verify is not None:
            ref_sign, ref_verify = reference.sm2_sign, reference.sm2_verify

            def cross(signer_id: bytes) -> bool:
                private, public = keypair()
                ours = sign(private, public, MESSAGE, signer_id)
                theirs = ref_sign(private, public, MESSAGE, signer_id)
                return (
                    len(ours) == 64
                    and ref_verify(public, MESSAGE, ours, signer_id)
                    and verify(public, MESSAGE, theirs, signer_id)
                    and not verify(public, MESSAGE + b"x", theirs, signer_id)
                )

            results["SM2 ⇄ gmssl, default ID"] = check("cross", lambda: cross(DEFAULT_ID))
            results["SM2 ⇄ gmssl, other ID"] = check("cross-id", lambda: cross(OTHER_ID))
    return results


def timings(lib: Library, seconds: float) -> dict[str, float]:
    """µs per operation for what the library offers."""
    out: dict[str, float] = {}
    if lib.sm2_keypair is not None and lib.sm2_sign is not None and lib.sm2_verify is not None:
        sign, verify = lib.sm2_sign, lib.sm2_verify
        private, public = lib.sm2_keypair()
        signature = sign(private, public, MESSAGE, DEFAULT_ID)
        out["SM2 sign"] = per_op_us(lambda: sign(private, public, MESSAGE, DEFAULT_ID), seconds)
        out["SM2 verify"] = per_op_us(lambda: verify(public, MESSAGE, signature, DEFAULT_ID), seconds)
    if lib.sm3 is not None:
        sm3 = lib.sm3
        out["SM3 200 B"] = per_op_us(lambda: sm3(MESSAGE), seconds)
    if (gcm := lib.sm4_gcm or lib.gcm_timing_only) is not None:
        key, nonce = os.urandom(16), os.urandom(12)
        out["SM4-GCM 64 B"] = per_op_us(lambda: gcm(key, nonce, MESSAGE[:64], b"field"), seconds)
    return out


def ed25519_timings(seconds: float) -> dict[str, dict[str, float]]:
    """Ed25519 sign and verify through libsodium (PyNaCl) and OpenSSL (cryptography), same message."""
    import nacl.bindings
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public, secret = nacl.bindings.crypto_sign_seed_keypair(os.urandom(32))
    signature = nacl.bindings.crypto_sign(MESSAGE, secret)[:64]
    key = Ed25519PrivateKey.generate()
    ossl_signature = key.sign(MESSAGE)
    ossl_public = key.public_key()
    return {
        "Ed25519 · PyNaCl": {
            "sign": per_op_us(lambda: nacl.bindings.crypto_sign(MESSAGE, secret), seconds),
            "verify": per_op_us(lambda: nacl.bindings.crypto_sign_open(signature + MESSAGE, public), seconds),
        },
        "Ed25519 · cryptography": {
            "sign": per_op_us(lambda: key.sign(MESSAGE), seconds),
            "verify": per_op_us(lambda: ossl_public.verify(ossl_signature, MESSAGE), seconds),
        },
    }


def version_of(distribution: str) -> str:
    """Installed version, or empty."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def load_library(factory: Callable[[], Library]) -> Library | str:
    """The library's adapter, or why it cannot be used here."""
    try:
        return factory()
    except ImportError as exc:
        return f"not installed ({exc.name})"


def main(argv: list[str] | None = None) -> None:
    """Run the checks and timings and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=0.4, help="time per measured operation")
    parser.add_argument("--only", nargs="*", help="library labels to run (default: all importable)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(f"# national crypto bench — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    # Ed25519 before and after the libraries, keeping the better of the two, so drifting load
    # on a shared machine does not flatter one side of the ratio.
    ed_before = ed25519_timings(args.seconds)
    reference = load_library(lib_gmssl)
    ref = reference if isinstance(reference, Library) else None
    rows: list[tuple[Library, dict[str, str], dict[str, float]]] = []
    for factory in LIBRARIES:
        loaded = load_library(factory)
        if isinstance(loaded, str):
            print(f"- {factory.__name__.removeprefix('lib_')}: {loaded}")
            continue
        if args.only and loaded.label not in args.only:
            continue
        with contextlib.suppress(KeyboardInterrupt):
            rows.append((loaded, checks(loaded, ref if loaded.module != "gmssl" else c_reference()), {}))
            rows[-1][2].update(timings(loaded, args.seconds))
    ed_after = ed25519_timings(args.seconds)
    ed = {
        label: {op: min(value, ed_after[label][op]) for op, value in times.items()}
        for label, times in ed_before.items()
    }

    print("\n## correctness\n")
    check_names = sorted({name for _, c, _ in rows for name in c}, key=_check_order)
    print("| library | version | signer ID / format | " + " | ".join(check_names) + " |")
    print("|---|---|---|" + "---|" * len(check_names))
    for lib, results, _ in rows:
        cells = [results.get(name, "-") for name in check_names]
        print(f"| {lib.label} | {version_of(lib.distribution)} | {lib.signer_id or '-'} | " + " | ".join(cells) + " |")

    nacl_verify = ed["Ed25519 · PyNaCl"]["verify"]
    nacl_sign = ed["Ed25519 · PyNaCl"]["sign"]
    print("\n## µs per operation (x = ratio to PyNaCl Ed25519 of the same kind)\n")
    print("| library | SM2 sign | SM2 verify | SM3 200 B | SM4-GCM 64 B |")
    print("|---|---|---|---|---|")
    for label, times in ed.items():
        print(f"| {label} | {times['sign']:.1f} (sign) | {times['verify']:.1f} (verify) | - | - |")
    for lib, _, times in rows:
        cells = []
        for name in ("SM2 sign", "SM2 verify", "SM3 200 B", "SM4-GCM 64 B"):
            value = times.get(name)
            if value is None:
                cells.append("-")
            elif name == "SM2 sign":
                cells.append(f"{value:.1f} ({value / nacl_sign:.1f}x)")
            elif name == "SM2 verify":
                cells.append(f"{value:.1f} ({value / nacl_verify:.1f}x)")
            else:
                cells.append(f"{value:.2f}")
        print(f"| {lib.label} | " + " | ".join(cells) + " |")
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"ran in {time.perf_counter() - started:.1f} s")


def c_reference() -> Library | None:
    """The reference for gmssl itself: a C library (gmssl-pyx, else gmalglib), so the check stays independent."""
    for factory in (lib_gmssl_pyx, lib_gmalglib):
        loaded = load_library(factory)
        if isinstance(loaded, Library):
            return loaded
    return None


def _check_order(name: str) -> int:
    order = ["SM3", "SM4 v", "SM4 x", "SM4-GCM", "SM2 GM", "SM2 ⇄ gmssl, d", "SM2 ⇄ gmssl, o"]
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))


if __name__ == "__main__":
    main()
