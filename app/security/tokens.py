"""API session tokens: short-lived JWTs for holders and operators, EdDSA or, under the national profile, SM2.

Credentials in QR codes are COSE, not JWT (see crypto/credential.py); these tokens only
authenticate API calls.

The profile's session key signs (app/security/keyring.py): Ed25519 through pyjwt, as always, or SM2
as crypto/jws.py writes it (header `{"alg": "SM2", "kid", "typ": "JWT"}`, r ‖ s with SM3 and the
default signer ID; pyjwt has no SM2). Every session key the keyring holds verifies, so tokens issued
before a profile switch keep working until they expire. The kid names the key and the key decides
the algorithm: a header naming the other algorithm is refused, both ways. The claims are checked by
the same pyjwt rules for both kinds.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.types import Options

from crypto.jws import EDDSA, JwsRejected, open_compact, read_header, sign_compact
from crypto.keys import PrivateKey, PublicKey, SigningKey, b64url, b64url_decode

ISSUER = "ecard"
HOLDER_AUDIENCE = "ecard-holder"
OPERATOR_AUDIENCE = "ecard-operator"
STEP_UP_AUDIENCE = "ecard-step-up"
LEEWAY_SECONDS = 5
# Far above any token this service signs (about 430 characters), far below what could hurt.
MAX_TOKEN_LENGTH = 8192
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "aud", "iss"]
# What pyjwt checks of an SM2 token's claims once crypto/jws.py has checked its signature: the EdDSA
# tokens' rules, named one by one (pyjwt would otherwise skip them with the signature it cannot check).
_SM2_CLAIM_RULES: Options = {
    "verify_signature": False,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iat": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "require": _REQUIRED_CLAIMS,
}


class InvalidToken(Exception):
    """The token is missing, forged, expired or for another audience."""


@dataclass(frozen=True, slots=True)
class HolderSession:
    """Who a holder access token speaks for."""

    ecard_id: uuid.UUID
    device_id: uuid.UUID
    card_ref: bytes
    region: str
    # The RFC 7638 thumbprint of the device key the token is bound to (its `cnf.jkt`, RFC 9449 §6):
    # every request with it must carry a DPoP proof by that key.
    jkt: str


@dataclass(frozen=True, slots=True)
class OperatorSession:
    """Who an operator token speaks for."""

    operator_id: uuid.UUID
    username: str
    role: str
    regions: tuple[str, ...]


class SessionTokens:
    """Signs session JWTs with the profile's session key; checks them by any session key held."""

    def __init__(self, signer: PrivateKey, accepted: tuple[PrivateKey, ...] = (), cache_size: int = 50_000) -> None:
        self._signer = signer
        self._kid = b64url(signer.kid)
        # The key of each kid, with its algorithm: the kid picks the key, never the header's alg.
        self._keys: dict[str, PublicKey] = {b64url(key.kid): key.verify_key("") for key in (signer, *accepted)}
        # pyjwt checks EdDSA tokens with `cryptography` keys.
        self._ed25519: dict[str, Ed25519PublicKey] = {
            b64url(key.kid): key.private.public_key() for key in (signer, *accepted) if isinstance(key, SigningKey)
        }
        # Verified holder tokens until they expire: a phone presents the same access token for
        # 15 minutes, and checking its signature again each time (~250 µs) would dominate issuance.
        self._holders: dict[str, tuple[HolderSession, int]] = {}
        self._cache_size = cache_size

    def _encode(self, claims: dict[str, Any], audience: str, ttl: int) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": audience, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        payload.update(claims)
        if isinstance(self._signer, SigningKey):
            return jwt.encode(payload, self._signer.private, algorithm=EDDSA, headers={"kid": self._kid})
        return sign_compact(self._signer, {"kid": self._kid, "typ": "JWT"}, payload)

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        rules: dict[str, Any] = {"audience": audience, "issuer": ISSUER, "leeway": LEEWAY_SECONDS}
        try:
            kid = read_header(token, MAX_TOKEN_LENGTH).get("kid")
            if not isinstance(kid, str) or kid not in self._keys:
                raise InvalidToken("the token is not signed by a session key of this service")
            claims: dict[str, Any]
            if kid in self._ed25519:
                claims = jwt.decode(
                    token, self._ed25519[kid], algorithms=[EDDSA], options={"require": _REQUIRED_CLAIMS}, **rules
                )
            else:
                open_compact(token, {kid: self._keys[kid]}, MAX_TOKEN_LENGTH)  # SM2, by this kid's key
                claims = jwt.decode(token, options=_SM2_CLAIM_RULES, **rules)
        except (jwt.PyJWTError, JwsRejected) as exc:
            raise InvalidToken(str(exc)) from None
        return claims

    def issue_holder(self, session: HolderSession, ttl: int) -> str:
        """An access token for a holder's device."""
        claims = {
            "sub": str(session.ecard_id),
            "dev": str(session.device_id),
            "crf": b64url(session.card_ref),
            "reg": session.region,
            "cnf": {"jkt": session.jkt},
        }
        return self._encode(claims, HOLDER_AUDIENCE, ttl)

    def read_holder(self, token: str) -> HolderSession:
        """Check a holder access token and say whose it is."""
        cached = self._holders.get(token)
        if cached is not None:
            if cached[1] > time.time():
                return cached[0]
            del self._holders[token]
        claims = self._decode(token, HOLDER_AUDIENCE)
        session = self._holder_session(claims)
        if len(self._holders) >= self._cache_size:
            self._holders.pop(next(iter(self._holders)))  # the oldest entry
        self._holders[token] = (session, int(claims["exp"]))
        return session

    @staticmethod
    def _holder_session(claims: dict[str, Any]) -> HolderSession:
        confirmation = claims.get("cnf")
        jkt = confirmation.get("jkt") if isinstance(confirmation, dict) else None
        if not isinstance(jkt, str) or not jkt:
            raise InvalidToken("the token is not bound to a device key (cnf.jkt); refresh it with a DPoP proof")
        try:
            return HolderSession(
                ecard_id=uuid.UUID(claims["sub"]),
                device_id=uuid.UUID(claims["dev"]),
                card_ref=b64url_decode(claims["crf"]),
                region=str(claims["reg"]),
                jkt=jkt,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidToken(f"token claims are incomplete: {exc}") from None

    def issue_operator(self, session: OperatorSession, ttl: int) -> str:
        """An access token for an operator."""
        claims = {
            "sub": str(session.operator_id),
            "name": session.username,
            "role": session.role,
            "regions": list(session.regions),
        }
        return self._encode(claims, OPERATOR_AUDIENCE, ttl)

    def read_operator(self, token: str) -> OperatorSession:
        """Check an operator token and say whose it is."""
        claims = self._decode(token, OPERATOR_AUDIENCE)
        try:
            regions = claims["regions"]
            if not isinstance(regions, list):
                raise TypeError("regions must be a list")
            return OperatorSession(
                operator_id=uuid.UUID(claims["sub"]),
                username=str(claims["name"]),
                role=str(claims["role"]),
                regions=tuple(str(region) for region in regions),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidToken(f"token claims are incomplete: {exc}") from None

    def issue_step_up(self, session: HolderSession, ttl: int) -> str:
        """Proof that the holder entered the PIN on this device a moment ago."""
        return self._encode({"sub": str(session.ecard_id), "dev": str(session.device_id)}, STEP_UP_AUDIENCE, ttl)

    def check_step_up(self, token: str, session: HolderSession) -> None:
        """Raise InvalidToken unless token is a live step-up of this holder's device."""
        claims = self._decode(token, STEP_UP_AUDIENCE)
        if claims.get("sub") != str(session.ecard_id) or claims.get("dev") != str(session.device_id):
            raise InvalidToken("step-up token belongs to another card or device")
