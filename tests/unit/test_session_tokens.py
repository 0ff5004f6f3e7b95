"""API session tokens (app/security/tokens.py) in both profiles: EdDSA checked by pyjwt too, SM2 by gmssl
too; the kid's key decides the algorithm; tokens of every session key held verify; any bad token is an
InvalidToken, never another exception."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
import pytest

from app.security.tokens import (
    HOLDER_AUDIENCE,
    ISSUER,
    OPERATOR_AUDIENCE,
    HolderSession,
    InvalidToken,
    OperatorSession,
    SessionTokens,
)
from crypto.keys import PrivateKey, SigningKey, b64url, b64url_decode
from crypto.sm import DEFAULT_SIGNER_ID, Sm2SigningKey
from tests.unit.crypto.test_sm import gmssl_verify

ED_KEY = SigningKey.from_seed(bytes(range(32)))
SM2_KEY = Sm2SigningKey(bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8"))
HOLDER = HolderSession(uuid.uuid4(), uuid.uuid4(), bytes(16), "510000", "jkt-of-the-device")
OPERATOR = OperatorSession(uuid.uuid4(), "op", "admin", ("510000",))
SIGNERS = pytest.mark.parametrize("signer", [ED_KEY, SM2_KEY], ids=["eddsa", "sm2"])


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)), b64url_decode(signature)


def forge(key: PrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWS with any header and claims, signed by key: what a bug or a holder of that key could make."""
    segment = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return segment + "." + b64url(key.sign(segment.encode()))


def operator_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": OPERATOR_AUDIENCE, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex,
              "sub": str(OPERATOR.operator_id), "name": "op", "role": "admin", "regions": ["510000"]}  # fmt: skip
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


@SIGNERS
def test_tokens_of_each_profile_round_trip(signer: PrivateKey) -> None:
    tokens = SessionTokens(signer)
    assert tokens.read_holder(tokens.issue_holder(HOLDER, 60)) == HOLDER
    assert tokens.read_operator(tokens.issue_operator(OPERATOR, 60)) == OPERATOR
    tokens.check_step_up(tokens.issue_step_up(HOLDER, 60), HOLDER)
    header, claims, signature = parts(tokens.issue_operator(OPERATOR, 60))
    alg = "SM2" if isinstance(signer, Sm2SigningKey) else "EdDSA"
    assert header == {"alg": alg, "kid": b64url(signer.kid), "typ": "JWT"}
    assert (claims["iss"], claims["aud"], len(signature)) == (ISSUER, OPERATOR_AUDIENCE, 64)


def test_an_eddsa_token_is_what_pyjwt_checks() -> None:
    token = SessionTokens(ED_KEY).issue_operator(OPERATOR, 60)
    claims = jwt.decode(token, ED_KEY.private.public_key(), algorithms=["EdDSA"], audience=OPERATOR_AUDIENCE)
    assert claims["sub"] == str(OPERATOR.operator_id)


def test_an_sm2_token_is_what_an_independent_sm2_checks() -> None:
    """gmssl (pure Python) verifies the signature over the JWS signing input with the default signer ID."""
    token = SessionTokens(SM2_KEY).issue_holder(HOLDER, 60)
    signing_input, _, signature = token.rpartition(".")
    assert gmssl_verify(SM2_KEY.public, b64url_decode(signature), signing_input.encode(), DEFAULT_SIGNER_ID)
    assert not gmssl_verify(SM2_KEY.public, b64url_decode(signature), signing_input.encode() + b" ", DEFAULT_SIGNER_ID)


def test_tokens_of_every_session_key_held_verify_and_only_those() -> None:
    """A profile switch: the new profile's key signs, the other's tokens verify until they expire."""
    international, national = SessionTokens(ED_KEY, (ED_KEY, SM2_KEY)), SessionTokens(SM2_KEY, (ED_KEY, SM2_KEY))
    for issuer in (international, national):
        for reader in (international, national):
            assert reader.read_operator(issuer.issue_operator(OPERATOR, 60)) == OPERATOR
            assert reader.read_holder(issuer.issue_holder(HOLDER, 60)) == HOLDER
    # A worker that holds one key refuses the other's tokens.
    with pytest.raises(InvalidToken, match="not signed by a session key"):
        SessionTokens(ED_KEY).read_operator(national.issue_operator(OPERATOR, 60))
    with pytest.raises(InvalidToken, match="not signed by a session key"):
        SessionTokens(SM2_KEY).read_holder(international.issue_holder(HOLDER, 60))
    # Another deployment's key of the same algorithm, whatever kid its token claims.
    stranger = Sm2SigningKey.generate()
    for kid in (b64url(stranger.kid), b64url(SM2_KEY.kid)):
        with pytest.raises(InvalidToken):
            national.read_operator(forge(stranger, {"alg": "SM2", "kid": kid, "typ": "JWT"}, operator_claims()))


def test_the_kids_key_decides_the_algorithm_both_ways() -> None:
    """An SM2 header on the Ed25519 key's kid (signed by either key) and an EdDSA header on the SM2 key's kid
    are refused; so are algorithms neither key has."""
    tokens = SessionTokens(SM2_KEY, (ED_KEY,))
    ed_kid, sm2_kid = b64url(ED_KEY.kid), b64url(SM2_KEY.kid)
    claims = operator_claims()
    # The honest forms verify, so each refusal below is the header's doing.
    assert tokens.read_operator(forge(SM2_KEY, {"alg": "SM2", "kid": sm2_kid, "typ": "JWT"}, claims)) == OPERATOR
    assert tokens.read_operator(forge(ED_KEY, {"alg": "EdDSA", "kid": ed_kid, "typ": "JWT"}, claims)) == OPERATOR
    for key, header in (
        (SM2_KEY, {"alg": "SM2", "kid": ed_kid, "typ": "JWT"}),
        (ED_KEY, {"alg": "SM2", "kid": ed_kid, "typ": "JWT"}),
        (ED_KEY, {"alg": "EdDSA", "kid": sm2_kid, "typ": "JWT"}),
        (SM2_KEY, {"alg": "EdDSA", "kid": sm2_kid, "typ": "JWT"}),
        (SM2_KEY, {"alg": "SM2", "typ": "JWT"}),
        (SM2_KEY, {"alg": "none", "kid": sm2_kid}),
        (ED_KEY, {"alg": "HS256", "kid": ed_kid}),
        (SM2_KEY, {"alg": "ES256", "kid": sm2_kid}),
    ):
        with pytest.raises(InvalidToken):
            tokens.read_operator(forge(key, header, claims))
    unsigned = b64url(json.dumps({"alg": "none", "kid": sm2_kid}).encode()) + "." + b64url(json.dumps(claims).encode())
    with pytest.raises(InvalidToken):
        tokens.read_operator(unsigned + ".")


BAD_CLAIMS = {
    "expired": {"exp": int(time.time()) - 60},
    "future": {"iat": int(time.time()) + 3600},
    "holder-audience": {"aud": HOLDER_AUDIENCE},
    "no-aud": {"aud": None},
    "other-issuer": {"iss": "someone-else"},
    "no-sub": {"sub": None},
    "sub-not-a-string": {"sub": 7},
    "exp-not-a-number": {"exp": "tomorrow"},
    "no-iat": {"iat": None},
    "jti-not-a-string": {"jti": 5},
}


@SIGNERS
@pytest.mark.parametrize("changes", BAD_CLAIMS.values(), ids=BAD_CLAIMS.keys())
def test_the_same_claim_rules_hold_in_both_profiles(signer: PrivateKey, changes: dict[str, Any]) -> None:
    tokens = SessionTokens(signer)
    alg = "SM2" if isinstance(signer, Sm2SigningKey) else "EdDSA"
    header = {"alg": alg, "kid": b64url(signer.kid), "typ": "JWT"}
    assert tokens.read_operator(forge(signer, header, operator_claims())) == OPERATOR
    with pytest.raises(InvalidToken):
        tokens.read_operator(forge(signer, header, operator_claims(**changes)))


@SIGNERS
def test_bad_tokens_are_invalid_tokens_never_other_errors(signer: PrivateKey) -> None:
    tokens = SessionTokens(signer, (ED_KEY, SM2_KEY))
    good = tokens.issue_holder(HOLDER, 60)
    header, payload, signature = good.split(".")
    deep = b64url(b"[" * 100_000)
    kid_list = b64url(json.dumps({"alg": "SM2", "kid": [1], "typ": "JWT"}).encode())
    for token in (
        "", ".", "..", "a.b", "a.b.c", "e30.e30.", "W10.e30.AA", "x" * 10_000, good + "A", good[:-2],
        f"{header}.é.{signature}", f"{header}.{payload}.é", f"{deep}.{payload}.{signature}",
        f"{header}.{deep}.{signature}", f"{kid_list}.{payload}.{signature}", f"{header}.{payload}.{b64url(bytes(64))}",
        f"{header}.{b64url(b'[]')}.{signature}", "é.é.é", good.replace(".", "..", 1),
    ):  # fmt: skip
        with pytest.raises(InvalidToken):
            tokens.read_holder(token)
        with pytest.raises(InvalidToken):
            tokens.read_operator(token)


@SIGNERS
def test_a_verified_holder_token_is_cached(signer: PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = SessionTokens(signer)
    token = tokens.issue_holder(HOLDER, 60)
    first = tokens.read_holder(token)
    monkeypatch.setattr(tokens, "_decode", lambda *_: pytest.fail("a cached token was checked again"))
    assert tokens.read_holder(token) is first
