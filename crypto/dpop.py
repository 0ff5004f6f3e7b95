"""DPoP proofs (RFC 9449) signed by a holder's Ed25519 device key: made and checked without a framework.

A proof is a compact JWS: header `{"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv":
"Ed25519", "x": …}}`, claims `jti` (unique), `htm` (the request's method), `htu` (its URI without
query and fragment), `iat`, and, beside an access token, `ath` (base64url SHA-256 of the token).
`check_proof` applies RFC 9449 §4.3 to one proof; the key it proves is named by its RFC 7638
thumbprint (`jkt`), which an access token carries as `cnf.jkt` to be bound to the device.

This is the building block of the holder API's sender-constrained tokens (issue 13, item 5); the
routes' use of it (activation, refresh, every holder call, the credential fast path) is described
in docs/dpop.md.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import nacl.bindings
import nacl.exceptions

from crypto.keys import b64url, b64url_decode, jwk_thumbprint

TYP = "dpop+jwt"
ALG = "EdDSA"
# A proof older than this (or from further ahead than the skew) is refused.
MAX_AGE = 60
CLOCK_SKEW = 5
MAX_PROOF_LENGTH = 2048
MAX_JTI_LENGTH = 64
_HEADER_MEMBERS = {"typ", "alg", "jwk"}
_JWK_MEMBERS = {"kty", "crv", "x"}


class DpopRefusal(StrEnum):
    """Why a proof is refused, as stable codes."""

    MALFORMED = "malformed"
    WRONG_TYPE = "wrong_type"
    WRONG_ALGORITHM = "wrong_algorithm"
    BAD_KEY = "bad_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_METHOD = "wrong_method"
    WRONG_URI = "wrong_uri"
    STALE = "stale"
    WRONG_TOKEN = "wrong_token"
    WRONG_KEY = "wrong_key"
    REPLAYED = "replayed"


class DpopError(Exception):
    """The proof is not acceptable; `reason` says why."""

    def __init__(self, reason: DpopRefusal, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Proof:
    """What a valid proof established: the device key (and its thumbprint), the proof's id and time."""

    public_key: bytes
    jkt: str
    jti: str
    iat: int


def thumbprint(public_key: bytes) -> str:
    """The RFC 7638 thumbprint of an Ed25519 key, base64url: the `jkt` of tokens bound to it."""
    return b64url(jwk_thumbprint(public_key))


def access_token_hash(access_token: str) -> str:
    """The `ath` claim for an access token: base64url SHA-256 of its ASCII bytes."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def normalised_uri(uri: str) -> str:
    """scheme://host[:port]/path, lower-case scheme and host, default ports dropped, no query or fragment."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URI")
    port = parts.port
    host = parts.hostname.lower()
    default = {"http": 80, "https": 443}[scheme]
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def make_proof(
    private_seed_and_public: bytes,
    method: str,
    uri: str,
    *,
    jti: str,
    iat: int | None = None,
    access_token: str | None = None,
) -> str:
    """A proof signed with an Ed25519 key given as libsodium's 64-byte secret (seed ‖ public): for clients."""
    public = private_seed_and_public[32:]
    header = {"typ": TYP, "alg": ALG, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(public)}}
    claims: dict[str, Any] = {
        "jti": jti,
        "htm": method,
        "htu": uri.split("?", 1)[0].split("#", 1)[0],
        "iat": int(time.time()) if iat is None else iat,
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    signing_input = _part(header) + "." + _part(claims)
    signed = nacl.bindings.crypto_sign(signing_input.encode("ascii"), private_seed_and_public)
    return signing_input + "." + b64url(signed[: nacl.bindings.crypto_sign_BYTES])


def _part(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _json_object(part: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part))
    except (ValueError, UnicodeDecodeError):
        raise DpopError(DpopRefusal.MALFORMED, "a proof part is not base64url JSON") from None
    if not isinstance(value, dict):
        raise DpopError(DpopRefusal.MALFORMED, "a proof part is not a JSON object")
    return value


def check_proof(
    proof: str,
    *,
    method: str,
    uri: str,
    now: int | None = None,
    access_token: str | None = None,
    jkt: str | None = None,
    max_age: int = MAX_AGE,
) -> Proof:
    """The proof's key and id if it proves possession for this request (RFC 9449 §4.3); DpopError otherwise.

    `access_token` given: the proof must carry its `ath`. `jkt` given: the proof's key must be that
    one (the token's `cnf.jkt`, or the device's registered key). Replays are the caller's to refuse
    (`SeenProofs`), by `jti`, for as long as a proof is fresh.
    """
    if not isinstance(proof, str) or len(proof) > MAX_PROOF_LENGTH or proof.count(".") != 2:
        raise DpopError(DpopRefusal.MALFORMED, "a DPoP proof is one compact JWS (three dot-separated parts)")
    header_part, claims_part, signature_part = proof.split(".")
    header = _json_object(header_part)
    if header.get("typ") != TYP:
        raise DpopError(DpopRefusal.WRONG_TYPE, f"the proof's typ must be {TYP!r}")
    if header.get("alg") != ALG:
        raise DpopError(DpopRefusal.WRONG_ALGORITHM, f"the proof's alg must be {ALG!r} (the device's Ed25519 key)")
    jwk = header.get("jwk")
    if set(header) - _HEADER_MEMBERS or not isinstance(jwk, dict) or set(jwk) != _JWK_MEMBERS:
        raise DpopError(DpopRefusal.BAD_KEY, "the header carries exactly typ, alg and an Ed25519 public jwk")
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise DpopError(DpopRefusal.BAD_KEY, "the proof's jwk must be an OKP Ed25519 public key")
    try:
        public = b64url_decode(jwk["x"])
        signature = b64url_decode(signature_part)
    except ValueError:
        raise DpopError(DpopRefusal.MALFORMED, "the key or the signature is not base64url") from None
    if len(public) != 32:
        raise DpopError(DpopRefusal.BAD_KEY, "the proof's key is not a 32-byte Ed25519 public key")
    key_thumbprint = thumbprint(public)
    if jkt is not None:
        # A key bound before was checked when it was registered (the point check costs ~100 µs).
        if key_thumbprint != jkt:
            raise DpopError(DpopRefusal.WRONG_KEY, "the proof is signed by another key than the one bound")
    elif not nacl.bindings.crypto_core_ed25519_is_valid_point(public):
        raise DpopError(DpopRefusal.BAD_KEY, "the proof's key is not a usable Ed25519 public key")
    if len(signature) != nacl.bindings.crypto_sign_BYTES:
        raise DpopError(DpopRefusal.BAD_SIGNATURE, "the proof's signature does not verify")
    try:
        nacl.bindings.crypto_sign_open(signature + f"{header_part}.{claims_part}".encode("ascii"), public)
    except nacl.exceptions.BadSignatureError:
        raise DpopError(DpopRefusal.BAD_SIGNATURE, "the proof's signature does not verify") from None
    claims = _json_object(claims_part)
    jti, htm, htu, iat = (claims.get(name) for name in ("jti", "htm", "htu", "iat"))
    if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_LENGTH:
        raise DpopError(DpopRefusal.MALFORMED, f"jti must be a string of 1 to {MAX_JTI_LENGTH} characters")
    if htm != method:
        raise DpopError(DpopRefusal.WRONG_METHOD, "the proof is for another HTTP method")
    try:
        if not isinstance(htu, str) or normalised_uri(htu) != normalised_uri(uri):
            raise ValueError
    except ValueError:
        raise DpopError(DpopRefusal.WRONG_URI, "the proof is for another URI") from None
    moment = int(time.time()) if now is None else now
    if not isinstance(iat, int) or isinstance(iat, bool) or not moment - max_age <= iat <= moment + CLOCK_SKEW:
        raise DpopError(DpopRefusal.STALE, f"the proof's iat must be within the last {max_age} s")
    if access_token is not None and claims.get("ath") != access_token_hash(access_token):
        raise DpopError(DpopRefusal.WRONG_TOKEN, "the proof's ath is not the hash of this access token")
    return Proof(public, key_thumbprint, jti, iat)


class SeenProofs:
    """The proofs accepted in the last `max_age` seconds, by (jkt, jti): a second use is a replay.

    Bounded (the oldest entries go first); one per process. Workers do not share it: a proof replayed
    to another worker within its freshness is caught only by a shared store (docs/dpop.md).
    """

    def __init__(self, max_age: int = MAX_AGE + CLOCK_SKEW, capacity: int = 200_000) -> None:
        self._max_age = max_age
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def first_use(self, proof: Proof, now: float | None = None) -> None:
        """Remember the proof; DpopError(REPLAYED) if it was seen and is still fresh."""
        moment = time.time() if now is None else now
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at > moment - self._max_age and len(self._seen) < self._capacity:
                break
            del self._seen[key]
        key = (proof.jkt, proof.jti)
        if key in self._seen:
            raise DpopError(DpopRefusal.REPLAYED, "this proof was used before; make a new one for each request")
        self._seen[key] = moment


def main(argv: list[str]) -> int:
    """`python -m crypto.dpop key`: a new device key (secret, public); `… proof SECRET METHOD URL [TOKEN]`: a proof.

    For trying the holder API by hand (README): the secret is libsodium's 64 bytes, unpadded base64url.
    """
    if argv[:1] == ["key"] and len(argv) == 1:
        secret = nacl.bindings.crypto_sign_keypair()[1]
        print(b64url(secret), b64url(secret[32:]))
        return 0
    if argv[:1] == ["proof"] and len(argv) in (4, 5):
        token = argv[4] if len(argv) == 5 else None
        print(make_proof(b64url_decode(argv[1]), argv[2], argv[3], jti=secrets.token_urlsafe(12), access_token=token))
        return 0
    print("usage: python -m crypto.dpop key | proof SECRET METHOD URL [ACCESS_TOKEN]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
