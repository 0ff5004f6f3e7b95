"""Key ids (RFC 7638 thumbprints) and the JWKS (RFC 7517, RFC 8037 OKP Ed25519) of issuer keys."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.jwk import jwks, parse_jwks, public_jwk
from crypto.keys import (
    KID_LENGTH,
    SigningKey,
    VerifyKey,
    b64url,
    b64url_decode,
    jwk_thumbprint,
    kid_for,
    load_private_pem,
    private_pem,
    private_raw,
    public_raw,
)

# RFC 8037 appendix A.1 (private key), A.3 (thumbprint) and A.4 (signature).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_SIGNING_INPUT = b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
RFC8037_SIGNATURE = "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"

KEY_A = SigningKey.from_seed(bytes(range(32)))
KEY_B = SigningKey.from_seed(bytes(range(32, 64)))
KEY_C = SigningKey.from_seed(bytes(range(64, 96)))
VERIFY_KEYS = [KEY_A.verify_key("510000"), KEY_B.verify_key("500000"), KEY_C.verify_key("510000")]


def document() -> dict[str, Any]:
    """A JWKS as a verifier would receive it: JSON text parsed back into plain objects."""
    loaded: dict[str, Any] = json.loads(json.dumps(jwks(VERIFY_KEYS)))
    return loaded


# --- kid ---------------------------------------------------------------------------------------


def test_rfc_8037_thumbprint_example() -> None:
    assert b64url(jwk_thumbprint(b64url_decode(RFC8037_X))) == RFC8037_THUMBPRINT


def test_kid_is_the_first_8_bytes_of_the_rfc_7638_thumbprint() -> None:
    public = b64url_decode(RFC8037_X)
    assert KID_LENGTH == 8
    assert kid_for(public) == b64url_decode(RFC8037_THUMBPRINT)[:8]
    assert VerifyKey(public=public, region="510000").kid == b64url_decode(RFC8037_THUMBPRINT)[:8]


def test_rfc_8037_private_key_gives_its_public_key_and_kid() -> None:
    key = SigningKey.from_seed(b64url_decode(RFC8037_D))
    assert b64url(key.public) == RFC8037_X
    assert key.kid == b64url_decode(RFC8037_THUMBPRINT)[:8]


def test_rfc_8037_signature_example_is_reproduced_and_verifies() -> None:
    key = SigningKey.from_seed(b64url_decode(RFC8037_D))
    signature = key.sign(RFC8037_SIGNING_INPUT)
    assert b64url(signature) == RFC8037_SIGNATURE
    assert key.verify_key("510000").verify(signature, RFC8037_SIGNING_INPUT)
    assert not key.verify_key("510000").verify(signature, RFC8037_SIGNING_INPUT + b".")


def test_public_jwk_kid_is_the_base64url_truncated_thumbprint() -> None:
    jwk = public_jwk(VerifyKey(public=b64url_decode(RFC8037_X), region="510000"))
    assert jwk["kid"] == b64url(b64url_decode(RFC8037_THUMBPRINT)[:8])
    assert jwk["x"] == RFC8037_X


@given(st.binary(min_size=32, max_size=32))
def test_kid_matches_the_thumbprint_of_any_key(seed: bytes) -> None:
    key = SigningKey.from_seed(seed)
    assert key.kid == jwk_thumbprint(key.public)[:KID_LENGTH]
    assert key.verify_key("510000").kid == key.kid


# --- keys --------------------------------------------------------------------------------------


def test_private_key_survives_pem_and_raw_round_trips() -> None:
    restored = SigningKey(load_private_pem(private_pem(KEY_A.private)))
    assert restored.kid == KEY_A.kid
    assert private_raw(restored.private) == bytes(range(32))
    assert public_raw(restored.private) == public_raw(restored.private.public_key()) == KEY_A.public


def test_load_private_pem_rejects_a_non_ed25519_key() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="Ed25519"):
        load_private_pem(pem)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_verify_key_requires_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKey(public=bytes(length), region="510000")


@pytest.mark.parametrize("text", ["AAAA=", "AA==", b"AAAA", None])
def test_b64url_decode_rejects_padding_and_non_text(text: Any) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


# --- JWKS --------------------------------------------------------------------------------------


def test_public_jwk_has_the_rfc_8037_members_and_the_region() -> None:
    key = VERIFY_KEYS[1]
    assert public_jwk(key) == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(key.public),
        "kid": b64url(key.kid),
        "alg": "EdDSA",
        "use": "sig",
        "region": "500000",
    }


def test_jwks_round_trips_through_json_and_parse_jwks() -> None:
    parsed = parse_jwks(document())
    assert parsed == {key.kid: key for key in VERIFY_KEYS}


def test_jwks_order_is_stable_by_region_then_kid() -> None:
    forward = jwks(VERIFY_KEYS)
    assert jwks(reversed(VERIFY_KEYS)) == forward
    expected = sorted(VERIFY_KEYS, key=lambda key: (key.region, key.kid))
    assert [entry["kid"] for entry in forward["keys"]] == [b64url(key.kid) for key in expected]
    assert [entry["region"] for entry in forward["keys"]] == ["500000", "510000", "510000"]


def test_empty_jwks_parses_to_no_keys() -> None:
    assert jwks([]) == {"keys": []}
    assert parse_jwks({"keys": []}) == {}


def test_parse_jwks_rejects_a_kid_that_does_not_match_the_key() -> None:
    doc = document()
    doc["keys"][0]["kid"] = doc["keys"][1]["kid"]
    with pytest.raises(ValueError, match="does not match"):
        parse_jwks(doc)


def test_parse_jwks_rejects_a_kid_of_the_full_thumbprint() -> None:
    doc = document()
    doc["keys"][0]["kid"] = b64url(jwk_thumbprint(b64url_decode(doc["keys"][0]["x"])))
    with pytest.raises(ValueError, match="does not match"):
        parse_jwks(doc)


def test_parse_jwks_rejects_a_key_swapped_under_a_published_kid() -> None:
    doc = document()
    doc["keys"][0]["x"] = doc["keys"][1]["x"]
    with pytest.raises(ValueError, match="does not match"):
        parse_jwks(doc)


@pytest.mark.parametrize(
    "entry",
    [
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "ec"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"},
        {"kty": "OKP", "crv": "X25519", "x": RFC8037_X, "kid": "x"},
        {"kty": "OKP", "crv": "Ed448", "x": "AAAA", "kid": "ed448"},
        {"kty": "oct", "k": "AAAA"},
        {"crv": "Ed25519", "x": RFC8037_X},
        "not an object",
        ["OKP"],
        None,
    ],
    ids=["ec", "rsa", "x25519", "ed448", "oct", "no-kty", "string", "array", "null"],
)
def test_parse_jwks_skips_keys_it_does_not_understand(entry: Any) -> None:
    doc = document()
    doc["keys"].insert(1, entry)
    assert parse_jwks(doc) == {key.kid: key for key in VERIFY_KEYS}


@pytest.mark.parametrize(
    "doc",
    [None, [], "keys", 42, {}, {"keys": None}, {"keys": {}}, {"keys": "abc"}, {"Keys": []}],
    ids=["null", "array", "string", "number", "empty", "keys-null", "keys-object", "keys-string", "case"],
)
def test_parse_jwks_rejects_anything_but_an_object_with_a_keys_array(doc: Any) -> None:
    with pytest.raises(ValueError, match="'keys' array"):
        parse_jwks(doc)


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("x", None),
        ("x", 42),
        ("x", b64url(bytes(31))),
        ("x", b64url(bytes(33))),
        ("x", RFC8037_X + "="),
        ("x", "A"),
        ("kid", None),
        ("kid", "A"),
    ],
)
def test_parse_jwks_rejects_an_ed25519_entry_with_a_bad_member(member: str, value: Any) -> None:
    doc = document()
    doc["keys"][0][member] = value
    with pytest.raises(ValueError, match="bad JWK entry"):
        parse_jwks(doc)


@pytest.mark.parametrize("member", ["x", "kid", "region"])
def test_parse_jwks_rejects_an_ed25519_entry_missing_a_member(member: str) -> None:
    doc = document()
    del doc["keys"][0][member]
    with pytest.raises(ValueError, match="bad JWK entry"):
        parse_jwks(doc)


# b64url_decode validates its alphabet: urlsafe_b64decode alone would drop stray characters.
@pytest.mark.parametrize("text", ["****", "AA+/", RFC8037_X[:10] + "!!" + RFC8037_X[10:], "AA AA"])
def test_b64url_decode_rejects_characters_outside_base64url(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)
