"""The public test vectors in tests/vectors/credentials.json.

Every case is checked the way an offline verifier would: keys come only from the JWKS in the
file, through `parse_jwks`. The generator must reproduce the file byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
import pytest
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage

from crypto.base45 import b45decode
from crypto.credential import PREFIX, CredentialRejected, Purpose, Rejection, open_credential, verify_credential
from crypto.jwk import parse_jwks
from crypto.keys import SigningKey, b64url_decode
from crypto.seal import CardRefSeal

VECTORS_DIR = Path(__file__).resolve().parents[2] / "vectors"
VECTORS_FILE = VECTORS_DIR / "credentials.json"
GENERATOR = VECTORS_DIR / "make_vectors.py"

DOCUMENT: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = DOCUMENT["cases"]
VALID_CASES = [case for case in CASES if case["expected"] == "valid"]
# The published test seeds of make_vectors.py, by kid.
SEEDS = {SigningKey.from_seed(seed).kid.hex(): seed for seed in (bytes(range(32)), bytes(range(64, 96)))}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verify(case: dict[str, Any]) -> Any:
    keys = parse_jwks(DOCUMENT["jwks"])
    return verify_credential(case["credential"], keys, DOCUMENT["now"], DOCUMENT["leeway"], DOCUMENT["lifetime"])


@pytest.mark.parametrize("case", VALID_CASES, ids=[case["name"] for case in VALID_CASES])
def test_valid_vector_verifies_with_the_expected_claims(case: dict[str, Any]) -> None:
    result = verify(case)
    expected = case["claims"]
    assert result.claims.region == expected["iss"]
    assert result.claims.expires_at == expected["exp"]
    assert result.claims.not_before == expected["nbf"]
    assert result.claims.nonce.hex() == expected["cti"]
    assert result.claims.sealed_ref.hex() == expected["sealed_ref"] != expected["card_ref"]
    assert result.claims.purpose is Purpose(expected["purpose"])
    assert result.claims.purpose.label == expected["purpose_label"]
    assert result.key.kid.hex() == case["kid_hex"]


def _open_independently(seal_key: bytes, sealed: bytes, nonce: bytes, not_before: int) -> bytes:
    """The seal as the file describes it, with hashlib and an XOR (not crypto/seal.py)."""
    pad = hmac.new(seal_key, nonce + not_before.to_bytes(4, "big"), hashlib.sha256).digest()[:16]
    return bytes(a ^ b for a, b in zip(sealed, pad, strict=True))


@pytest.mark.parametrize("case", VALID_CASES, ids=[case["name"] for case in VALID_CASES])
def test_valid_vector_sealed_ref_opens_to_its_card_ref_with_the_published_seal(case: dict[str, Any]) -> None:
    expected = case["claims"]
    seal = DOCUMENT["seals"]["keys"][case["kid_hex"]]
    seal_key = bytes.fromhex(seal["seal_key_hex"])
    sealed, nonce = bytes.fromhex(expected["sealed_ref"]), bytes.fromhex(expected["cti"])
    assert _open_independently(seal_key, sealed, nonce, expected["nbf"]).hex() == expected["card_ref"]
    # The issuer's own path: the kid's seal, derived from the key's secret as the file says.
    keys = parse_jwks(DOCUMENT["jwks"])
    derived = CardRefSeal.derive(SEEDS[case["kid_hex"]], "Ed25519", seal["region"], bytes.fromhex(case["kid_hex"]))
    assert derived.key == seal_key
    opened = open_credential(case["credential"], keys, {bytes.fromhex(case["kid_hex"]): derived})
    assert opened.claims.card_ref.hex() == expected["card_ref"]


@pytest.mark.parametrize("case", VALID_CASES, ids=[case["name"] for case in VALID_CASES])
def test_valid_vector_cose_bytes_and_payload_match_the_credential(case: dict[str, Any]) -> None:
    raw = b45decode(case["credential"][len(PREFIX) :])
    assert raw.hex() == case["cose_hex"]
    assert cbor2.loads(raw).value[2].hex() == case["claims"]["payload_hex"]


@pytest.mark.parametrize("case", VALID_CASES, ids=[case["name"] for case in VALID_CASES])
def test_valid_vector_verifies_with_pycose_and_the_jwks_alone(case: dict[str, Any]) -> None:
    jwk = next(entry for entry in DOCUMENT["jwks"]["keys"] if b64url_decode(entry["kid"]).hex() == case["kid_hex"])
    message = CoseMessage.decode(bytes.fromhex(case["cose_hex"]))
    message.key = OKPKey(crv=Ed25519, x=b64url_decode(jwk["x"]))
    assert message.verify_signature() is True


def test_largest_valid_vector_is_139_bytes_and_213_characters() -> None:
    case = next(case for case in VALID_CASES if case["name"] == "valid-largest")
    assert len(bytes.fromhex(case["cose_hex"])) == 139
    assert len(case["credential"]) == 213


REJECTED_CASES = [case for case in CASES if case["expected"] != "valid"]


@pytest.mark.parametrize("case", REJECTED_CASES, ids=[case["name"] for case in REJECTED_CASES])
def test_rejected_vector_fails_with_the_expected_reason(case: dict[str, Any]) -> None:
    with pytest.raises(CredentialRejected) as info:
        verify(case)
    assert info.value.reason is Rejection(case["expected"])


HEADER_CASE_NAMES = {
    "malformed-crit-unknown-label",
    "malformed-crit-known-label",
    "malformed-unknown-label",
    "malformed-alg-as-text",
    "malformed-extra-typ",
    "malformed-duplicate-kid",
    "malformed-non-canonical-kid-length",
    "malformed-kid-also-unprotected",
    "malformed-unprotected-not-empty",
}
HEADER_CASES = [case for case in REJECTED_CASES if case["name"] in HEADER_CASE_NAMES]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[case["name"] for case in HEADER_CASES])
def test_header_vectors_verify_with_pycose_and_fail_on_the_header_alone(case: dict[str, Any]) -> None:
    raw = b45decode(case["credential"][len(PREFIX) :])
    protected = cbor2.loads(raw).value[0]
    kid = cbor2.loads(protected)[4]
    jwk = next(entry for entry in DOCUMENT["jwks"]["keys"] if b64url_decode(entry["kid"]) == kid)
    message = CoseMessage.decode(raw)
    message.key = OKPKey(crv=Ed25519, x=b64url_decode(jwk["x"]))
    assert message.verify_signature() is True
    assert case["expected"] == "malformed"
    with pytest.raises(CredentialRejected) as info:
        verify(case)
    assert info.value.reason is Rejection.MALFORMED


def test_vectors_hold_every_header_variant_and_both_lifetime_edges() -> None:
    names = {case["name"] for case in CASES}
    assert HEADER_CASE_NAMES | {"valid-lifetime-edge", "lifetime-exceeded", "lifetime-exceeded-a-year"} <= names


def test_vectors_cover_every_outcome_with_unique_names() -> None:
    outcomes = {case["expected"] for case in CASES}
    assert outcomes == {"valid"} | {reason.value for reason in Rejection}
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names))


def test_jwks_in_the_vectors_parses_to_two_regions() -> None:
    keys = parse_jwks(DOCUMENT["jwks"])
    assert sorted(key.region for key in keys.values()) == ["500000", "510000"]


def test_generator_reproduces_the_file_byte_for_byte() -> None:
    generator = load_generator()
    assert generator.render().encode("utf-8") == VECTORS_FILE.read_bytes()
    assert generator.render() == generator.render()


def test_generator_check_mode_passes_as_a_script() -> None:
    result = subprocess.run(  # the generator must also work when run directly, as the README says
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
