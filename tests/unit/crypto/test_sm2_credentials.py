"""Credentials and status lists signed with SM2 beside Ed25519: algorithm by key, publication, offline.

The SM2 codes are checked by an independent implementation (the pure-Python gmssl) over a
Sig_structure cbor2 builds, as pycose checks the Ed25519 ones (test_cose_interop.py).
"""

from __future__ import annotations

import json

import cbor2
import pytest
import segno

from crypto.base45 import b45decode, b45encode
from crypto.cose import protected_header, sign1
from crypto.credential import (
    PREFIX,
    Claims,
    CredentialRejected,
    Purpose,
    Rejection,
    issue_credential,
    open_credential,
    seal_for,
    unseal,
    verify_credential,
)
from crypto.jwk import jwks, parse_jwks
from crypto.keys import ALG_EDDSA, ALG_SM2_SM3, PublicKey, SigningKey
from crypto.offline import OfflineKit, kit_document, verify_offline
from crypto.sm import Sm2SigningKey, Sm2VerifyKey
from crypto.status_list import StatusList, StatusListRejected, open_status_list, sign_status_list
from tests.unit.crypto.test_sm import gmssl_verify

REGION = "510000"
NOW = 1_750_000_000
LEEWAY = 5
ED_KEY = SigningKey.from_seed(bytes(range(32)))
SM2_KEY = Sm2SigningKey(bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8"))
KEYS: dict[bytes, PublicKey] = {ED_KEY.kid: ED_KEY.verify_key(REGION), SM2_KEY.kid: SM2_KEY.verify_key(REGION)}
CARD_REF = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE = bytes.fromhex("01020304050607")
SEALS = {ED_KEY.kid: seal_for(ED_KEY, REGION), SM2_KEY.kid: seal_for(SM2_KEY, REGION)}


def claims(**changes: object) -> Claims:
    fields: dict[str, object] = {
        "card_ref": CARD_REF, "nonce": NONCE, "region": REGION, "purpose": Purpose.TRANSIT,
        "not_before": NOW - 10, "expires_at": NOW + 50,
    }  # fmt: skip
    fields.update(changes)
    return Claims(**fields)  # type: ignore[arg-type]


def cose(text: str) -> bytes:
    return b45decode(text[len(PREFIX) :])


def test_an_sm2_code_names_its_algorithm_and_verifies_beside_ed25519_codes() -> None:
    sm2_text, ed_text = issue_credential(SM2_KEY, claims()), issue_credential(ED_KEY, claims())
    for text, key, alg in [(sm2_text, SM2_KEY, ALG_SM2_SM3), (ed_text, ED_KEY, ALG_EDDSA)]:
        protected = cbor2.loads(cose(text)).value[0]
        assert cbor2.loads(protected) == {1: alg, 4: key.kid}
        verified = verify_credential(text, KEYS, NOW, LEEWAY)
        assert verified.claims.sealed_ref != CARD_REF and verified.key.kid == key.kid
        assert unseal(verified, SEALS).claims == claims()


def test_the_independent_implementation_verifies_an_sm2_code() -> None:
    tag = cbor2.loads(cose(issue_credential(SM2_KEY, claims())))
    protected, _, payload, signature = tag.value
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    assert gmssl_verify(SM2_KEY.public, signature, to_be_signed, SM2_KEY.signer_id)
    assert not gmssl_verify(SM2_KEY.public, signature, to_be_signed + b"x", SM2_KEY.signer_id)


def _forged(alg: int, kid: bytes, signer: SigningKey | Sm2SigningKey) -> str:
    """A code whose header names alg and kid, signed by signer over that header."""
    protected = protected_header(kid, alg=alg)
    payload = cbor2.loads(cose(issue_credential(ED_KEY, claims()))).value[2]
    structure = cbor2.dumps(["Signature1", protected, b"", payload])
    message = cbor2.CBORTag(18, [protected, {}, payload, signer.sign(structure)])
    return PREFIX + b45encode(cbor2.dumps(message))


@pytest.mark.parametrize(
    ("alg", "kid", "signer"),
    [
        # The Ed25519 key's kid in a header naming SM2, the signature a real SM2 one (by another key).
        (ALG_SM2_SM3, ED_KEY.kid, SM2_KEY),
        # The SM2 key's kid in a header naming EdDSA, with a real Ed25519 signature.
        (ALG_EDDSA, SM2_KEY.kid, ED_KEY),
    ],
    ids=["sm2-header-on-ed25519-kid", "eddsa-header-on-sm2-kid"],
)
def test_a_header_naming_another_algorithm_than_the_kids_key_is_refused(
    alg: int, kid: bytes, signer: SigningKey | Sm2SigningKey
) -> None:
    with pytest.raises(CredentialRejected) as caught:
        open_credential(_forged(alg, kid, signer), KEYS, SEALS)
    assert caught.value.reason is Rejection.BAD_SIGNATURE
    assert "algorithm" in caught.value.detail


def test_an_sm2_signature_by_another_key_is_refused() -> None:
    stranger = Sm2SigningKey.generate()
    with pytest.raises(CredentialRejected) as caught:
        open_credential(_forged(ALG_SM2_SM3, SM2_KEY.kid, stranger), KEYS, SEALS)
    assert caught.value.reason is Rejection.BAD_SIGNATURE


def test_the_largest_sm2_code_costs_the_four_bytes_of_its_algorithm_label() -> None:
    largest = claims(region="999999", purpose=Purpose.GENERAL, not_before=2**32 - 1, expires_at=2**32 - 1)
    ed_size, sm2_size = len(cose(issue_credential(ED_KEY, largest))), len(cose(issue_credential(SM2_KEY, largest)))
    assert (ed_size, sm2_size) == (139, 143)
    # 143 bytes are 219 characters: inside QR version 8-M (221), now that codes carry no status index.
    typical = issue_credential(SM2_KEY, claims())
    assert len(cose(typical)) == len(cose(issue_credential(ED_KEY, claims()))) + 4 == 143
    for text in (issue_credential(SM2_KEY, largest), typical):
        assert segno.make(text, error="m", micro=False).version == 8


def test_both_kinds_are_published_in_one_jwks_and_read_back() -> None:
    document = jwks(KEYS.values())
    sm2_entry = next(entry for entry in document["keys"] if entry["kty"] == "EC")
    assert (sm2_entry["crv"], sm2_entry["alg"], sm2_entry["region"]) == ("SM2", "SM2", REGION)
    read = parse_jwks(json.loads(json.dumps(document)))
    assert set(read) == set(KEYS)
    assert isinstance(read[SM2_KEY.kid], Sm2VerifyKey) and read[SM2_KEY.kid].public == SM2_KEY.public
    # A kid that is not the key's SM3 thumbprint is refused.
    sm2_entry["kid"] = document["keys"][0]["kid"] if document["keys"][0] is not sm2_entry else "AAAAAAAAAAA"
    with pytest.raises(ValueError, match="kid"):
        parse_jwks(document)


def test_an_offline_gate_verifies_sm2_codes_with_an_sm2_signed_kit() -> None:
    token = sign_status_list(
        SM2_KEY, region=REGION, subject=f"https://ecard.example/v1/status-lists/{REGION}",
        status_list=StatusList.from_statuses({}, size=0), issued_at=NOW - 60, expires_at=NOW + 3600, ttl=600,
    )  # fmt: skip
    assert open_status_list(token, KEYS).region == REGION
    kit = OfflineKit.from_json(json.dumps(kit_document(REGION, KEYS.values(), token)))
    result = verify_offline(issue_credential(SM2_KEY, claims()), kit, NOW, LEEWAY)
    assert result.accepted
    ed_result = verify_offline(issue_credential(ED_KEY, claims()), kit, NOW, LEEWAY)
    assert ed_result.accepted


def test_a_status_list_naming_another_algorithm_than_its_key_is_refused() -> None:
    status_list = StatusList.from_statuses([0] * 8, bits=2)
    token = sign_status_list(
        SM2_KEY, region=REGION, subject="s", status_list=status_list, issued_at=NOW, expires_at=NOW + 60, ttl=60
    )
    message = cbor2.loads(token)
    header = cbor2.loads(message.value[0])
    confused = protected_header(SM2_KEY.kid, header[16], ALG_EDDSA)
    forged = cbor2.dumps(cbor2.CBORTag(18, [confused, {}, message.value[2], message.value[3]]))
    with pytest.raises(StatusListRejected) as caught:
        open_status_list(forged, KEYS)
    assert caught.value.reason is Rejection.BAD_SIGNATURE
    assert sign1(SM2_KEY, b"x")  # signing takes the key's algorithm, whatever the caller
