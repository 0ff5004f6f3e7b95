"""Interoperability with pycose 1.1, an independent COSE implementation, in both directions.

Credentials issued here must verify with pycose given only the public key, and COSE_Sign1
messages made and signed by pycose must verify here.
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage, Sign1Message

from crypto.base45 import b45decode, b45encode
from crypto.cose import sig_structure
from crypto.credential import (
    NONCE_LENGTH,
    PREFIX,
    Claims,
    CredentialRejected,
    Purpose,
    Rejection,
    encode_claims,
    issue_credential,
    seal_for,
    unseal,
    verify_credential,
)
from crypto.keys import SigningKey

SEED = bytes(range(32))
KEY = SigningKey.from_seed(SEED)
REGION = "510000"
NOW = 1_700_000_000
KEYS = {KEY.kid: KEY.verify_key(REGION)}

CLAIMS = Claims(
    card_ref=bytes.fromhex("00112233445566778899aabbccddeeff"),
    nonce=bytes.fromhex("01020304050607"),
    region=REGION,
    purpose=Purpose.PARK,
    not_before=NOW - 30,
    expires_at=NOW + 30,
)


PAYLOAD = encode_claims(CLAIMS, seal_for(KEY, REGION))


def pycose_public_key(key: SigningKey = KEY) -> OKPKey:
    return OKPKey(crv=Ed25519, x=key.public)


def pycose_private_key(seed: bytes = SEED) -> OKPKey:
    return OKPKey(crv=Ed25519, d=seed, x=SigningKey.from_seed(seed).public)


def cose_bytes(text: str) -> bytes:
    assert text.startswith(PREFIX)
    return b45decode(text[len(PREFIX) :])


def expected_claims_map(claims: Claims) -> dict[int, object]:
    return {
        1: claims.region,
        4: claims.expires_at,
        5: claims.not_before,
        7: claims.nonce,
        # The card reference only sealed (crypto/seal.py): pycose sees 16 bytes that are not it.
        -65537: [
            seal_for(KEY, claims.region).seal(claims.card_ref, claims.nonce, claims.not_before),
            int(claims.purpose),
        ],
    }


def pycose_sign1(payload: bytes, seed: bytes = SEED) -> bytes:
    """A tagged COSE_Sign1 made and signed entirely by pycose: alg EdDSA and kid protected."""
    kid = SigningKey.from_seed(seed).kid
    message = Sign1Message(phdr={Algorithm: EdDSA, KID: kid}, payload=payload, key=pycose_private_key(seed))
    return message.encode(tag=True, sign=True)


# --- ours → pycose -----------------------------------------------------------------------------


def test_pycose_decodes_an_issued_credential_as_cose_sign1() -> None:
    message = CoseMessage.decode(cose_bytes(issue_credential(KEY, CLAIMS)))
    assert isinstance(message, Sign1Message)
    assert message.phdr == {Algorithm: EdDSA, KID: KEY.kid}
    assert message.uhdr == {}


def test_pycose_verifies_the_signature_of_an_issued_credential() -> None:
    message = CoseMessage.decode(cose_bytes(issue_credential(KEY, CLAIMS)))
    message.key = pycose_public_key()
    assert message.verify_signature() is True


def test_pycose_sees_the_expected_claims_in_the_payload() -> None:
    message = CoseMessage.decode(cose_bytes(issue_credential(KEY, CLAIMS)))
    assert cbor2.loads(message.payload) == expected_claims_map(CLAIMS)


def test_pycose_rejects_an_issued_credential_under_another_key() -> None:
    message = CoseMessage.decode(cose_bytes(issue_credential(KEY, CLAIMS)))
    message.key = pycose_public_key(SigningKey.from_seed(bytes(range(32, 64))))
    assert message.verify_signature() is False


def test_pycose_rejects_an_issued_credential_with_a_flipped_signature_byte() -> None:
    raw = cose_bytes(issue_credential(KEY, CLAIMS))
    protected, unprotected, payload, signature = cbor2.loads(raw).value
    signature = bytes([signature[0] ^ 0x80]) + signature[1:]
    message = CoseMessage.decode(cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, signature])))
    message.key = pycose_public_key()
    assert message.verify_signature() is False


@settings(max_examples=30, deadline=None)
@given(
    card_ref=st.binary(min_size=16, max_size=16),
    nonce=st.binary(min_size=NONCE_LENGTH, max_size=NONCE_LENGTH),
    region=st.text(alphabet="0123456789", min_size=6, max_size=6),
    purpose=st.sampled_from(Purpose),
    window=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(sorted),
)
def test_pycose_verifies_any_issued_credential(
    card_ref: bytes, nonce: bytes, region: str, purpose: Purpose, window: list[int]
) -> None:
    claims = Claims(card_ref, nonce, region, purpose, not_before=window[0], expires_at=window[1])
    message = CoseMessage.decode(cose_bytes(issue_credential(KEY, claims)))
    message.key = pycose_public_key()
    assert message.verify_signature() is True
    assert cbor2.loads(message.payload) == expected_claims_map(claims)


# --- pycose → ours -----------------------------------------------------------------------------


def test_credential_signed_by_pycose_verifies_here() -> None:
    text = PREFIX + b45encode(pycose_sign1(PAYLOAD))
    result = verify_credential(text, KEYS, NOW, 0)
    assert unseal(result, {KEY.kid: seal_for(KEY, REGION)}).claims == CLAIMS
    assert result.key.kid == KEY.kid


def test_pycose_and_this_module_produce_byte_identical_messages() -> None:
    # Ed25519 is deterministic and both encode the protected header as {1: -8, 4: kid}.
    assert pycose_sign1(PAYLOAD) == cose_bytes(issue_credential(KEY, CLAIMS))


def test_pycose_message_signed_by_an_unpublished_key_is_unknown_key() -> None:
    text = PREFIX + b45encode(pycose_sign1(PAYLOAD, seed=bytes(range(32, 64))))
    with pytest.raises(CredentialRejected) as info:
        verify_credential(text, KEYS, NOW, 0)
    assert info.value.reason is Rejection.UNKNOWN_KEY


def test_pycose_message_with_the_kid_only_unprotected_is_malformed() -> None:
    message = Sign1Message(phdr={Algorithm: EdDSA}, uhdr={KID: KEY.kid}, payload=PAYLOAD, key=pycose_private_key())
    text = PREFIX + b45encode(message.encode(tag=True, sign=True))
    with pytest.raises(CredentialRejected) as info:
        verify_credential(text, KEYS, NOW, 0)
    assert info.value.reason is Rejection.MALFORMED


def test_pycose_message_with_an_extra_protected_parameter_is_malformed() -> None:
    # The profile's header is exact: a correctly signed message from a standard producer that
    # adds a parameter (here content type) is refused, not half understood.
    message = Sign1Message(
        phdr={Algorithm: EdDSA, KID: KEY.kid, 3: "application/cwt"},
        payload=PAYLOAD,
        key=pycose_private_key(),
    )
    message_bytes = message.encode(tag=True, sign=True)
    decoded = CoseMessage.decode(message_bytes)
    decoded.key = pycose_public_key()
    assert decoded.verify_signature() is True
    with pytest.raises(CredentialRejected) as info:
        verify_credential(PREFIX + b45encode(message_bytes), KEYS, NOW, 0)
    assert info.value.reason is Rejection.MALFORMED
    assert "label 3 (content type)" in info.value.detail


def test_pycose_message_with_crit_is_malformed() -> None:
    message = Sign1Message(
        phdr={Algorithm: EdDSA, KID: KEY.kid, 2: [99], 99: 1}, payload=PAYLOAD, key=pycose_private_key()
    )
    with pytest.raises(CredentialRejected) as info:
        verify_credential(PREFIX + b45encode(message.encode(tag=True, sign=True)), KEYS, NOW, 0)
    assert info.value.reason is Rejection.MALFORMED
    assert "crit" in info.value.detail


@given(st.binary(max_size=300), st.binary(max_size=300), st.sampled_from([0, 65_280, 65_535, 65_536, 70_000]))
@settings(max_examples=60)
def test_sig_structure_is_the_cbor_rfc_9052_defines(protected: bytes, payload: bytes, padding: int) -> None:
    # Padding reaches the two- and four-byte length heads without generating 64 KB of random data.
    payload += bytes(padding)
    assert sig_structure(protected, payload) == cbor2.dumps(["Signature1", protected, b"", payload])
