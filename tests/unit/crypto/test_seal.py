"""The card reference sealed per code (crypto/seal.py): round trips, independence, known answers, and the
unlinkability check itself on codes that should pass it and codes that must fail it."""

from __future__ import annotations

import hashlib
import hmac
import os

import cbor2
import pytest

from crypto.base45 import b45encode
from crypto.cose import sign1
from crypto.credential import NONCE_LENGTH, PREFIX, Claims, Purpose, issue_credential, seal_for
from crypto.keys import SigningKey
from crypto.seal import INFO, CardRefSeal, tweak
from crypto.sm import Sm2SigningKey, hmac_sm3, sm4_encrypt_block
from tests.unlinkability import assert_unlinkable

REGION = "510000"
ED_KEY = SigningKey.from_seed(bytes(range(32)))
SM2_KEY = Sm2SigningKey(bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8"))
CARD_REF = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE = bytes.fromhex("01020304050607")
NBF = 1_750_000_000


@pytest.mark.parametrize("key", [ED_KEY, SM2_KEY], ids=["ed25519-hmac-pad", "sm2-sm4"])
def test_a_seal_opens_to_the_reference_and_hides_it(key: SigningKey | Sm2SigningKey) -> None:
    seal = seal_for(key, REGION)
    sealed = seal.seal(CARD_REF, NONCE, NBF)
    assert len(sealed) == 16 and sealed != CARD_REF
    assert seal.open(sealed, NONCE, NBF) == CARD_REF
    # Another nonce or another nbf opens it to something else: both are part of the code's key.
    assert seal.open(sealed, bytes(7), NBF) != CARD_REF
    assert seal.open(sealed, NONCE, NBF + 1) != CARD_REF


def test_the_ed25519_seal_is_the_reference_xored_with_an_hmac_sha256_pad() -> None:
    seal = seal_for(ED_KEY, REGION)
    pad = hmac.new(seal.key, NONCE + NBF.to_bytes(4, "big"), hashlib.sha256).digest()[:16]
    assert seal.seal(CARD_REF, NONCE, NBF) == bytes(a ^ b for a, b in zip(CARD_REF, pad, strict=True))
    assert seal.national is False


def test_the_sm4_seal_is_hmac_sm3_then_one_sm4_block() -> None:
    seal = seal_for(SM2_KEY, REGION)
    code_key = hmac_sm3(seal.key, tweak(NONCE, NBF))[:16]
    assert seal.seal(CARD_REF, NONCE, NBF) == sm4_encrypt_block(code_key, CARD_REF)
    assert seal.national is True


def test_the_seal_key_is_hkdf_of_the_keys_secret_bound_to_algorithm_region_and_kid() -> None:
    secret = bytes(range(32))
    base = CardRefSeal.derive(secret, "Ed25519", REGION, ED_KEY.kid)
    assert base == seal_for(ED_KEY, REGION)
    others = {
        CardRefSeal.derive(secret, "Ed25519", "500000", ED_KEY.kid).key,
        CardRefSeal.derive(secret, "Ed25519", REGION, bytes(8)).key,
        CardRefSeal.derive(secret, "SM2", REGION, ED_KEY.kid).key,
        CardRefSeal.derive(bytes(32), "Ed25519", REGION, ED_KEY.kid).key,
    }
    assert base.key not in others and len(others) == 4
    assert INFO == b"ecard/card-ref-seal/v1"
    with pytest.raises(ValueError, match="algorithm"):
        CardRefSeal.derive(secret, "RSA", REGION, ED_KEY.kid)


def test_a_seal_takes_exactly_16_bytes() -> None:
    seal = seal_for(ED_KEY, REGION)
    with pytest.raises(ValueError):
        seal.seal(CARD_REF[:15], NONCE, NBF)
    with pytest.raises(ValueError):
        seal.open(CARD_REF + b"\x00", NONCE, NBF)


def test_many_seals_of_one_reference_are_all_different_even_with_one_nbf() -> None:
    seal = seal_for(ED_KEY, REGION)
    same_nbf = {seal.seal(CARD_REF, os.urandom(NONCE_LENGTH), NBF) for _ in range(5_000)}
    same_nonce = {seal.seal(CARD_REF, NONCE, NBF + i) for i in range(5_000)}
    assert len(same_nbf) == len(same_nonce) == 5_000
    assert not same_nbf & same_nonce


def _codes(key: SigningKey | Sm2SigningKey, count: int, nonce: bytes | None = None) -> list[str]:
    """count codes of one card as a bundle windows them (30 s apart), two per nbf."""
    codes = []
    for i in range(count):
        not_before = NBF + 30 * (i // 2)
        fresh = nonce or os.urandom(NONCE_LENGTH)
        claims = Claims(CARD_REF, fresh, REGION, Purpose.TRANSIT, not_before, not_before + 60)
        codes.append(issue_credential(key, claims))
    return codes


@pytest.mark.parametrize("key", [ED_KEY, SM2_KEY], ids=["ed25519", "sm2"])
def test_codes_of_one_card_share_nothing_but_the_allowed_fields(key: SigningKey | Sm2SigningKey) -> None:
    parts = assert_unlinkable(_codes(key, 60), CARD_REF)
    assert len({part.allowed[0] for part in parts}) == 1  # one header: alg and kid


def test_the_check_fails_on_codes_that_repeat_a_value() -> None:
    # The same nonce and nbf twice gives the same seal: the one way a seal could link, and caught.
    repeated = _codes(ED_KEY, 2, nonce=NONCE)
    with pytest.raises(AssertionError, match="share"):
        assert_unlinkable(repeated)


def test_the_check_fails_on_the_linkable_layout_of_before() -> None:
    # [card_ref, purpose, status_index] in clear, as EC1 codes carried it until issue 13.
    payload = cbor2.dumps({1: REGION, 4: NBF + 60, 5: NBF, 7: NONCE, -65537: [CARD_REF, 1, 4321]})
    text = PREFIX + b45encode(sign1(ED_KEY, payload))
    with pytest.raises((AssertionError, ValueError)):
        assert_unlinkable([text])
    # And a clear reference in a well-formed code is found by the forbidden-bytes check.
    clear = cbor2.dumps({1: REGION, 4: NBF + 60, 5: NBF, 7: NONCE, -65537: [CARD_REF, 1]})
    with pytest.raises(AssertionError):
        assert_unlinkable([PREFIX + b45encode(sign1(ED_KEY, clear))], CARD_REF)
