"""The trust list's JWS (crypto/trust_list.py): EdDSA checked by pyjwt too, SM2 checked by gmssl too, and
every way of passing a list off under the pinned key refused."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from jwt.algorithms import OKPAlgorithm

from crypto.keys import SigningKey, b64url, b64url_decode
from crypto.sm import DEFAULT_SIGNER_ID, Sm2SigningKey
from crypto.trust_list import (
    TRUST_LIST_ISSUER,
    TRUST_LIST_TYPE,
    TrustListRejected,
    sign_trust_list,
    signer_jwk,
    verify_trust_list,
)
from tests.unit.crypto.test_sm import gmssl_verify

NOW = int(time.time())
CLAIMS = {"iss": TRUST_LIST_ISSUER, "iat": NOW, "exp": NOW + 3600, "regions": [{"region": "510000", "keys": []}]}
ED_KEY = SigningKey.from_seed(bytes(range(32)))
SM2_KEY = Sm2SigningKey(bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8"))
KEYS = pytest.mark.parametrize("key", [ED_KEY, SM2_KEY], ids=["ed25519", "sm2"])


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)), b64url_decode(signature)


def forge(key: SigningKey | Sm2SigningKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWS with any header, signed by key: what a holder of the key, or a bug, could produce."""
    segment = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return segment + "." + b64url(key.sign(segment.encode()))


@KEYS
def test_a_list_verifies_under_its_pinned_key(key: SigningKey | Sm2SigningKey) -> None:
    token = sign_trust_list(key, CLAIMS)
    assert verify_trust_list(token, signer_jwk(key)) == CLAIMS
    header, _, signature = parts(token)
    assert header == {"alg": "SM2" if isinstance(key, Sm2SigningKey) else "EdDSA", "kid": b64url(key.kid),
                      "typ": TRUST_LIST_TYPE}  # fmt: skip
    assert len(signature) == 64


def test_an_eddsa_list_is_what_pyjwt_checks() -> None:
    token = sign_trust_list(ED_KEY, CLAIMS)
    pinned = OKPAlgorithm.from_jwk(signer_jwk(ED_KEY))
    assert jwt.decode(token, pinned, algorithms=["EdDSA"]) == CLAIMS  # type: ignore[arg-type]
    assert jwt.get_unverified_header(token)["typ"] == TRUST_LIST_TYPE


def test_an_sm2_list_is_what_an_independent_sm2_checks() -> None:
    """gmssl (pure Python) verifies the signature over the JWS signing input with the default signer ID."""
    token = sign_trust_list(SM2_KEY, CLAIMS)
    signing_input, _, signature = token.rpartition(".")
    assert gmssl_verify(SM2_KEY.public, b64url_decode(signature), signing_input.encode(), DEFAULT_SIGNER_ID)
    jwk = signer_jwk(SM2_KEY)
    assert jwk["kty"] == "EC" and jwk["crv"] == "SM2" and jwk["alg"] == "SM2"
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == SM2_KEY.public[1:33]


def test_the_pinned_key_decides_the_algorithm_both_ways() -> None:
    """An Ed25519 pin never takes an SM2 header (nor the reverse), even signed by the right key type's twin."""
    sm2_token = sign_trust_list(SM2_KEY, CLAIMS)
    ed_token = sign_trust_list(ED_KEY, CLAIMS)
    with pytest.raises(TrustListRejected, match="verifies EdDSA"):
        verify_trust_list(sm2_token, signer_jwk(ED_KEY))
    with pytest.raises(TrustListRejected, match="verifies SM2"):
        verify_trust_list(ed_token, signer_jwk(SM2_KEY))
    # The right algorithm name on the other key's signature: the signature decides.
    header = {"alg": "EdDSA", "kid": b64url(ED_KEY.kid), "typ": TRUST_LIST_TYPE}
    with pytest.raises(TrustListRejected, match="does not verify"):
        verify_trust_list(forge(SM2_KEY, header, CLAIMS), signer_jwk(ED_KEY))


@KEYS
@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "typ": TRUST_LIST_TYPE},
        {"alg": "HS256", "kid": "x", "typ": TRUST_LIST_TYPE},
        {"alg": "{alg}", "kid": "{kid}", "typ": "JWT"},
        {"alg": "{alg}", "kid": "AAAAAAAAAAA", "typ": TRUST_LIST_TYPE},
        {"alg": "{alg}", "kid": "{kid}", "typ": TRUST_LIST_TYPE, "crit": ["exp"]},
        {"alg": "{alg}", "kid": "{kid}", "typ": TRUST_LIST_TYPE, "jwk": {"kty": "OKP"}},
    ],
    ids=["none", "hs256", "other-typ", "other-kid", "crit", "embedded-jwk"],
)
def test_headers_other_than_the_exact_one_are_refused(key: SigningKey | Sm2SigningKey, header: dict[str, Any]) -> None:
    alg = "SM2" if isinstance(key, Sm2SigningKey) else "EdDSA"
    header = {name: value.format(alg=alg, kid=b64url(key.kid)) if isinstance(value, str) else value
              for name, value in header.items()}  # fmt: skip
    with pytest.raises(TrustListRejected):
        verify_trust_list(forge(key, header, CLAIMS), signer_jwk(key))


@KEYS
def test_a_changed_byte_anywhere_is_refused(key: SigningKey | Sm2SigningKey) -> None:
    token = sign_trust_list(key, CLAIMS)
    other = sign_trust_list(key, {**CLAIMS, "regions": []})
    header, payload, signature = token.split(".")
    for forged in (
        f"{header}.{other.split('.')[1]}.{signature}",  # another list under this signature
        f"{header}.{payload}.{b64url(bytes(64))}",
        f"{header}.{payload}.{signature[:-2]}",
        f"{header}.{payload}",
        f"{header}.{payload}.{signature}.",
        token + "A",
    ):
        with pytest.raises(TrustListRejected):
            verify_trust_list(forged, signer_jwk(key))


@KEYS
@pytest.mark.parametrize(
    "claims",
    [
        {**CLAIMS, "exp": NOW - 1},
        {**CLAIMS, "iat": NOW + 3600},
        {**CLAIMS, "iss": "someone-else"},
        {**CLAIMS, "exp": str(NOW + 3600)},
        {key: value for key, value in CLAIMS.items() if key != "iat"},
    ],
    ids=["expired", "future", "other-issuer", "string-exp", "no-iat"],
)
def test_a_signed_list_with_wrong_times_or_issuer_is_refused(
    key: SigningKey | Sm2SigningKey, claims: dict[str, Any]
) -> None:
    with pytest.raises(TrustListRejected, match=r"expired|iss"):
        verify_trust_list(sign_trust_list(key, claims), signer_jwk(key), now=NOW)


@pytest.mark.parametrize(
    "pinned",
    [
        {},
        {"kty": "RSA", "n": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "x": "!!"},
        {"kty": "EC", "crv": "SM2", "x": "AA"},
    ],
    ids=["empty", "rsa", "bad-x", "short-sm2"],
)
def test_a_bad_pinned_key_is_a_clear_refusal(pinned: dict[str, str]) -> None:
    with pytest.raises(TrustListRejected, match="pinned key"):
        verify_trust_list(sign_trust_list(ED_KEY, CLAIMS), pinned)


def test_garbage_tokens_are_refusals_never_other_errors() -> None:
    for token in ("", "a.b", "a.b.c", "...", "e30.e30.AA", "W10.e30.AA", 12, "x" * (2 << 20)):
        with pytest.raises(TrustListRejected):
            verify_trust_list(token, signer_jwk(ED_KEY))  # type: ignore[arg-type]


@KEYS
def test_a_right_header_over_a_hostile_payload_or_signature_is_a_refusal(key: SigningKey | Sm2SigningKey) -> None:
    """A payload part that is not ASCII, or JSON nested past the parser's limit: refused, not an exception."""
    header, payload, signature = sign_trust_list(key, CLAIMS).split(".")
    deep = b64url(b"[" * 100_000)
    for forged in (f"{header}.é.{signature}", f"{header}.{deep}.{signature}", f"{header}.{payload}.é"):
        with pytest.raises(TrustListRejected):
            verify_trust_list(forged, signer_jwk(key))
    with pytest.raises(TrustListRejected, match="header is not base64url JSON"):
        verify_trust_list(f"{deep}.{payload}.{signature}", signer_jwk(key))
