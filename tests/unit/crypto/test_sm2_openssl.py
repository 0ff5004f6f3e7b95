"""SM2 verification by libcrypto (crypto/sm2_openssl.py) against gmalglib, gmssl and the standard vector.

test_sm.py's SM2 tests run through whichever verifier Sm2VerifyKey picked (libcrypto here); these
hold the two verifiers to the same answers, the pieces (ZA, the DER signature) to independent ones,
and the fallback to gmalglib to working.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from gmalglib import sm2 as gm_sm2  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import sm2_openssl
from crypto.sm import DEFAULT_SIGNER_ID, Sm2SigningKey, Sm2VerifyKey
from tests.unit.crypto.test_sm import (
    CURVE_N,
    KAT_MESSAGE,
    KAT_PUBLIC,
    KAT_SIGNATURE,
    OTHER_ID,
    gmssl_e,
    gmssl_hash,
    gmssl_sign,
)

needs_libcrypto = pytest.mark.skipif(not sm2_openssl.available(), reason="no libcrypto 3 with SM2 here")


def both(public: bytes, signer_id: bytes = DEFAULT_SIGNER_ID) -> tuple[object, object]:
    openssl = sm2_openssl.load(public, signer_id)
    assert openssl is not None
    return openssl, gm_sm2.SM2(pk=public, uid=signer_id)


@needs_libcrypto
def test_verify_keys_use_libcrypto_where_it_is_there() -> None:
    assert isinstance(Sm2VerifyKey(KAT_PUBLIC, "510000")._verifier, sm2_openssl.OpenSslSm2Verifier)


@needs_libcrypto
def test_the_standard_vector_verifies_and_its_variants_do_not() -> None:
    openssl, _ = both(KAT_PUBLIC)
    assert openssl.verify(KAT_MESSAGE, KAT_SIGNATURE)  # type: ignore[attr-defined]
    assert not openssl.verify(b"message digesT", KAT_SIGNATURE)  # type: ignore[attr-defined]
    other_id = sm2_openssl.load(KAT_PUBLIC, OTHER_ID)
    assert other_id is not None and not other_id.verify(KAT_MESSAGE, KAT_SIGNATURE)


def test_za_is_the_standards_formula() -> None:
    """e = SM3(ZA ‖ M) with our ZA equals the vector's e, which the test's gmssl-based formula gives too."""
    assert gmssl_hash(sm2_openssl.za(DEFAULT_SIGNER_ID, KAT_PUBLIC) + KAT_MESSAGE) == gmssl_e(
        KAT_PUBLIC, KAT_MESSAGE, DEFAULT_SIGNER_ID
    )


@given(r=st.integers(0, 2**256 - 1), s=st.integers(0, 2**256 - 1))
@settings(max_examples=300)
def test_the_der_signature_is_what_cryptography_encodes(r: int, s: int) -> None:
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert sm2_openssl.der_signature(raw) == encode_dss_signature(r, s)


@needs_libcrypto
@pytest.mark.parametrize("signer_id", [DEFAULT_SIGNER_ID, OTHER_ID], ids=["default-id", "other-id"])
def test_signatures_of_gmalglib_and_gmssl_verify_and_tampered_ones_do_not(signer_id: bytes) -> None:
    for _ in range(5):
        key = Sm2SigningKey.generate(signer_id)
        openssl, gmalglib = both(key.public, signer_id)
        message = os.urandom(100)
        for signature in (key.sign(message), gmssl_sign(key.private, key.public, message, signer_id)):
            assert openssl.verify(message, signature) and gmalglib.verify(message, signature)  # type: ignore[attr-defined]
            flipped = bytes([signature[0] ^ 1]) + signature[1:]
            assert not openssl.verify(message, flipped)  # type: ignore[attr-defined]
            assert not openssl.verify(message + b"\x00", signature)  # type: ignore[attr-defined]


@needs_libcrypto
@given(signature=st.binary(min_size=64, max_size=64), message=st.binary(max_size=40))
@settings(max_examples=300)
def test_both_verifiers_refuse_the_same_garbage(signature: bytes, message: bytes) -> None:
    openssl, gmalglib = both(KAT_PUBLIC)
    assert openssl.verify(message, signature) is False  # type: ignore[attr-defined]
    assert not gmalglib.verify(message, signature)  # type: ignore[attr-defined]


@needs_libcrypto
@pytest.mark.parametrize(
    "signature",
    [
        bytes(64),
        b"\xff" * 64,
        CURVE_N.to_bytes(32, "big") * 2,
        KAT_SIGNATURE[:32] + bytes(32),
        bytes(32) + KAT_SIGNATURE[32:],
        (int.from_bytes(KAT_SIGNATURE[:32], "big") + CURVE_N).to_bytes(33, "big")[1:] + KAT_SIGNATURE[32:],
    ],
    ids=["zeros", "ones", "r=s=n", "s=0", "r=0", "r+n-truncated"],
)
def test_out_of_range_values_are_refused(signature: bytes) -> None:
    openssl, _ = both(KAT_PUBLIC)
    assert openssl.verify(KAT_MESSAGE, signature) is False  # type: ignore[attr-defined]


@needs_libcrypto
def test_a_refusal_leaves_no_error_behind_for_the_next_check() -> None:
    openssl, _ = both(KAT_PUBLIC)
    for _ in range(100):
        assert not openssl.verify(KAT_MESSAGE, bytes(64))  # type: ignore[attr-defined]
    assert openssl.verify(KAT_MESSAGE, KAT_SIGNATURE)  # type: ignore[attr-defined]


def test_without_libcrypto_verify_keys_fall_back_to_gmalglib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm2_openssl, "_LIBCRYPTO", None)
    key = Sm2VerifyKey(KAT_PUBLIC, "510000")
    assert not isinstance(key._verifier, sm2_openssl.OpenSslSm2Verifier)
    assert key.verify(KAT_SIGNATURE, KAT_MESSAGE)
    assert not key.verify(KAT_SIGNATURE, b"message digesT")
    assert not key.verify(bytes(64), KAT_MESSAGE)


def test_the_environment_can_force_gmalglib() -> None:
    probe = "from crypto import sm2_openssl; print(sm2_openssl.available())"
    env = {**os.environ, "ECARD_SM2_VERIFIER": "gmalglib"}
    forced = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "False"
