"""DPoP proofs (RFC 9449): ours verify, pyjwt's verify, and every broken variant is refused with its reason."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import nacl.bindings
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crypto import dpop
from crypto.dpop import (
    DpopError,
    DpopRefusal,
    Proof,
    SeenProofs,
    access_token_hash,
    check_proof,
    make_proof,
    normalised_uri,
    thumbprint,
)
from crypto.keys import b64url, b64url_decode, private_raw, public_raw

URI = "https://ecard.example/v1/holder/credentials"
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln"


def device() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, private_raw(key) + public_raw(key)


def refused(reason: DpopRefusal, proof: str, **checks: Any) -> None:
    options: dict[str, Any] = {"method": "POST", "uri": URI, **checks}
    with pytest.raises(DpopError) as raised:
        check_proof(proof, **options)
    assert raised.value.reason is reason, raised.value.detail


def resigned(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A proof of arbitrary header and claims, correctly signed (to test the rules after the signature)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = nacl.bindings.crypto_sign(signing_input.encode(), secret)[:64]
    return signing_input + "." + b64url(signature)


def test_a_proof_proves_its_key_for_its_request() -> None:
    key, secret = device()
    proof = make_proof(secret, "POST", URI + "?ignored=1", jti="a1", access_token=TOKEN)
    found = check_proof(proof, method="POST", uri=URI, access_token=TOKEN, jkt=thumbprint(public_raw(key)))
    assert found.public_key == public_raw(key) and found.jti == "a1"
    assert abs(found.iat - time.time()) < 5


def test_pyjwt_proofs_verify_here() -> None:
    """An independent JOSE implementation makes the proof: our check agrees with it."""
    key, _ = device()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(public_raw(key))}
    claims = {
        "jti": "pyjwt-1",
        "htm": "GET",
        "htu": "https://ECARD.example:443/v1/holder/card",
        "iat": int(time.time()),
    }
    claims["ath"] = access_token_hash(TOKEN)
    proof = jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": "dpop+jwt", "jwk": jwk})
    found = check_proof(proof, method="GET", uri="https://ecard.example/v1/holder/card", access_token=TOKEN)
    assert found.jkt == thumbprint(public_raw(key))
    # And pyjwt accepts ours.
    ours = make_proof(private_raw(key) + public_raw(key), "GET", URI, jti="ours-1")
    decoded = jwt.decode(ours, key.public_key(), algorithms=["EdDSA"])
    assert decoded["htu"] == URI and jwt.get_unverified_header(ours)["jwk"] == jwk


def test_the_thumbprint_is_rfc_7638() -> None:
    # RFC 8037 A.3: the thumbprint of its Ed25519 example key.
    x = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert thumbprint(x) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"typ": "JWT"}, DpopRefusal.WRONG_TYPE),
        ({"alg": "none"}, DpopRefusal.WRONG_ALGORITHM),
        ({"alg": "HS256"}, DpopRefusal.WRONG_ALGORITHM),
        ({"kid": "x"}, DpopRefusal.BAD_KEY),
        ({"jwk": {"kty": "EC", "crv": "P-256", "x": "AA"}}, DpopRefusal.BAD_KEY),
        ({"jwk": None}, DpopRefusal.BAD_KEY),
    ],
)
def test_the_header_is_exactly_this_profiles(change: dict[str, Any], reason: DpopRefusal) -> None:
    key, secret = device()
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(public_raw(key))}}
    claims = {"jti": "h", "htm": "POST", "htu": URI, "iat": int(time.time())}
    refused(reason, resigned(secret, {**header, **change}, claims))


def test_a_private_key_in_the_header_is_refused() -> None:
    key, secret = device()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(public_raw(key)), "d": b64url(private_raw(key))}
    claims = {"jti": "d", "htm": "POST", "htu": URI, "iat": int(time.time())}
    refused(DpopRefusal.BAD_KEY, resigned(secret, {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk}, claims))


def test_a_signature_by_another_key_is_refused() -> None:
    key, _ = device()
    _, other = device()
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(public_raw(key))}}
    refused(DpopRefusal.BAD_SIGNATURE, resigned(other, header, {"jti": "s", "htm": "POST", "htu": URI, "iat": 1}))


def test_a_changed_claim_breaks_the_signature() -> None:
    _, secret = device()
    header, claims, signature = make_proof(secret, "POST", URI, jti="c").split(".")
    changed = json.loads(b64url_decode(claims))
    changed["htm"] = "GET"
    refused(DpopRefusal.BAD_SIGNATURE, f"{header}.{b64url(json.dumps(changed).encode())}.{signature}")


@pytest.mark.parametrize(
    ("checks", "reason"),
    [
        ({"method": "GET"}, DpopRefusal.WRONG_METHOD),
        ({"uri": "https://ecard.example/v1/holder/card"}, DpopRefusal.WRONG_URI),
        ({"uri": "https://other.example/v1/holder/credentials"}, DpopRefusal.WRONG_URI),
        ({"uri": "http://ecard.example/v1/holder/credentials"}, DpopRefusal.WRONG_URI),
        ({"now": int(time.time()) + 120}, DpopRefusal.STALE),
        ({"now": int(time.time()) - 60}, DpopRefusal.STALE),
        ({"access_token": TOKEN + "x"}, DpopRefusal.WRONG_TOKEN),
        ({"jkt": thumbprint(bytes(31) + b"\x01")}, DpopRefusal.WRONG_KEY),
    ],
)
def test_a_proof_for_another_request_time_token_or_key_is_refused(checks: dict[str, Any], reason: DpopRefusal) -> None:
    _, secret = device()
    refused(reason, make_proof(secret, "POST", URI, jti="r", access_token=TOKEN), **checks)


def test_a_proof_without_ath_does_not_carry_a_token() -> None:
    _, secret = device()
    refused(DpopRefusal.WRONG_TOKEN, make_proof(secret, "POST", URI, jti="n"), access_token=TOKEN)


@pytest.mark.parametrize(
    "text",
    ["", "a.b", "a.b.c.d", "!!.??.**", "x" * 3000, b64url(b"[1]") + "." + b64url(b"{}") + ".AA"],
)
def test_garbage_is_malformed_never_an_exception_of_another_kind(text: str) -> None:
    with pytest.raises(DpopError) as raised:
        check_proof(text, method="POST", uri=URI)
    assert raised.value.reason in (DpopRefusal.MALFORMED, DpopRefusal.WRONG_TYPE)


def test_a_second_use_of_a_proof_is_a_replay_while_it_is_fresh() -> None:
    seen = SeenProofs(max_age=65, capacity=3)
    proof = Proof(bytes(32), "jkt", "jti-1", 0)
    seen.first_use(proof, now=1000.0)
    with pytest.raises(DpopError) as raised:
        seen.first_use(proof, now=1060.0)
    assert raised.value.reason is DpopRefusal.REPLAYED
    # Another key's proof with the same jti is another proof.
    seen.first_use(Proof(bytes(32), "other", "jti-1", 0), now=1060.0)
    # Past its freshness the entry is gone (and a stale proof is refused by check_proof anyway).
    seen.first_use(proof, now=1066.0)


def test_uris_compare_as_rfc_9449_says() -> None:
    assert normalised_uri("HTTPS://Ecard.Example:443/v1/x?q=1#f") == "https://ecard.example/v1/x"
    assert normalised_uri("http://ecard.example:8000/v1/x") == "http://ecard.example:8000/v1/x"
    with pytest.raises(ValueError):
        normalised_uri("ftp://ecard.example/")


def test_the_command_line_makes_a_key_and_proofs_that_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert dpop.main(["key"]) == 0
    secret, public = capsys.readouterr().out.split()
    assert b64url_decode(secret)[32:] == b64url_decode(public)
    assert dpop.main(["proof", secret, "POST", "https://ecard.example/v1/holder/credentials", "token"]) == 0
    proof = capsys.readouterr().out.strip()
    checked = dpop.check_proof(
        proof, method="POST", uri="https://ecard.example/v1/holder/credentials", access_token="token"
    )
    assert checked.public_key == b64url_decode(public)
    assert dpop.main(["proof", secret]) == 2
