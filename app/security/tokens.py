"""API session tokens: short-lived JWTs (EdDSA, pyjwt) for holders and operators.

Credentials in QR codes are COSE, not JWT (see crypto/credential.py); these tokens only
authenticate API calls.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from crypto.keys import SigningKey, b64url, b64url_decode

ISSUER = "ecard"
HOLDER_AUDIENCE = "ecard-holder"
OPERATOR_AUDIENCE = "ecard-operator"
STEP_UP_AUDIENCE = "ecard-step-up"
LEEWAY_SECONDS = 5


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
    """Signs and checks session JWTs with the service's session key."""

    def __init__(self, key: SigningKey, cache_size: int = 50_000) -> None:
        self._key = key
        self._kid = b64url(key.kid)
        self._public = key.private.public_key()
        # Verified holder tokens until they expire: a phone presents the same access token for
        # 15 minutes, and checking its signature again each time (~250 µs) would dominate issuance.
        self._holders: dict[str, tuple[HolderSession, int]] = {}
        self._cache_size = cache_size

    def _encode(self, claims: dict[str, Any], audience: str, ttl: int) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": audience, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        payload.update(claims)
        return jwt.encode(payload, self._key.private, algorithm="EdDSA", headers={"kid": self._kid})

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public,
                algorithms=["EdDSA"],
                audience=audience,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
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
