"""Verify a credential without the server: the issuers' keys and a signed validity period, carried by the gate.

An offline kit is one region's bundle, as JSON:

    {"region": "510000",
     "jwks": {"keys": [...]},          the JWKS crypto/jwk.py publishes
     "status_list": "<base64url>"}     the region's signed kit period: a status list token
                                       (crypto/status_list.py) with no entries

Other members are ignored. Loading a kit checks the JWKS and the token, which must be signed
by a key of the kit's JWKS that signs for the kit's region.

Codes are unlinkable (crypto/seal.py): they carry no card reference a gate can read and no
status-list index, since a stable index is a stable identifier. So a gate offline decides on
the code alone: signed by a key of a kit that is not stale, within its window of at most
`lifetime` + `leeway` seconds. A card's status is enforced where the card is known, by the
issuer: it signs no code for a card that is not active, so a suspension or revocation holds
offline once the codes signed before it have expired (at most the largest bundle's horizon,
README's "Offline gates"), and the gate's batch upload finds the scans made in between. The
kit's token keeps its Token Status List form, without entries: its iat and exp say how long
the kit may be used (a key withdrawn from the JWKS stops being accepted offline when the kits
that carried it go stale), and an older gate that still reads an index finds none.

`verify_offline` decides a scan as the server would, minus the card's status and two things a
gate cannot know alone:

- Single use. A credential is valid for about a minute and may be shown at several gates;
  only the server sees every scan. An offline gate must keep its own set of the (sealed_ref,
  nonce) pairs it accepted, refusing a pair seen again until the credential has expired,
  and upload its scans to the server's batch verify endpoint once it is back online, so
  that replays across gates are found afterwards.
- A fresh kit. The kit is as old as its token's `iat`. Past its `exp` (plus the clock-skew
  leeway) it is stale: the scan is refused with `status_stale`, unless the gate's policy allows
  a stale kit, in which case the decision is made on it and flagged `stale`.

Which purposes a gate takes is its own configuration: the result names the purpose.

The credential's own rules are the server's (crypto/credential.py): the exact COSE header, and
the bounded window. The longest lifetime is a parameter (`lifetime`, `--lifetime`), 60 s by
default as the service's ECARD_CREDENTIAL_LIFETIME: like `leeway`, it is the gate's own
configuration rather than a kit member, so no kit file can widen it. A gate of a deployment
that sets another lifetime passes the service's value.

Command line, one JSON object on stdout; exit 0 accepted, 1 rejected, 2 bad usage or kit:

    python -m crypto.offline --kit kit.json [--kit other.json] [--now UNIX] [--leeway S] [--lifetime S]
                             [--allow-stale] CREDENTIAL

CREDENTIAL may be `-` to read it from stdin (only line breaks are stripped: Base45 has a
space in its alphabet, so a credential can end with one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from crypto.credential import DEFAULT_LEEWAY, DEFAULT_LIFETIME, CredentialRejected, Rejection, verify_credential
from crypto.jwk import jwks, parse_jwks
from crypto.keys import PublicKey, b64url, b64url_decode
from crypto.status_list import MAX_LIST_BYTES, StatusListRejected, VerifiedStatusList, open_status_list


class OfflineReason(StrEnum):
    """Why an offline scan is refused: the credential's own codes, then the kit's."""

    MALFORMED = Rejection.MALFORMED.value
    UNKNOWN_KEY = Rejection.UNKNOWN_KEY.value
    BAD_SIGNATURE = Rejection.BAD_SIGNATURE.value
    EXPIRED = Rejection.EXPIRED.value
    NOT_YET_VALID = Rejection.NOT_YET_VALID.value
    LIFETIME_EXCEEDED = Rejection.LIFETIME_EXCEEDED.value
    REGION_NOT_ACCEPTED = "region_not_accepted"
    STATUS_STALE = "status_stale"


class OfflineKitError(ValueError):
    """The kit cannot be used: not JSON of the expected shape, a bad JWKS or a bad status list."""


def kit_document(region: str, keys: Iterable[PublicKey], status_list_token: bytes) -> dict[str, Any]:
    """The JSON object of an offline kit: region, JWKS and the status list token."""
    return {"region": region, "jwks": jwks(keys), "status_list": b64url(status_list_token)}


@dataclass(frozen=True, slots=True)
class OfflineKit:
    """One region's keys and its verified token (the kit's signed period)."""

    region: str
    keys: Mapping[bytes, PublicKey]
    status_list: VerifiedStatusList

    @classmethod
    def from_json(cls, data: bytes | str, *, max_list_bytes: int = MAX_LIST_BYTES) -> OfflineKit:
        """Parse and check a kit; raise OfflineKitError when it cannot be used."""
        try:
            document = json.loads(data)
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise OfflineKitError(f"kit is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise OfflineKitError("kit must be a JSON object")
        region = document.get("region")
        if not (isinstance(region, str) and len(region) == 6 and region.isascii() and region.isdigit()):
            raise OfflineKitError("kit region must be a 6-digit code")
        try:
            keys = parse_jwks(document.get("jwks"))
        except ValueError as exc:
            raise OfflineKitError(f"kit jwks: {exc}") from None
        encoded = document.get("status_list")
        try:
            token = b64url_decode(encoded) if isinstance(encoded, str) else None
        except ValueError:
            token = None
        if token is None:
            raise OfflineKitError("kit status_list must be base64url text")
        try:
            status_list = open_status_list(token, keys, max_list_bytes=max_list_bytes)
        except StatusListRejected as exc:
            raise OfflineKitError(f"kit status list ({exc.reason}): {exc.detail}") from None
        if status_list.region != region:
            raise OfflineKitError(f"kit status list covers region {status_list.region}, not {region}")
        return cls(region=region, keys=keys, status_list=status_list)


@dataclass(frozen=True, slots=True)
class OfflineClaims:
    """What a verified credential says, for display and for the gate's own nonce set.

    `sealed_ref` is the card reference as this code seals it: unique to the code, it says nothing
    about the card (only the issuer can open it).
    """

    sealed_ref: str
    nonce: str
    region: str
    purpose: str
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class OfflineResult:
    """The decision on one offline scan.

    `stale` and `list_expires_at` describe the kit the decision used (False and None when it
    failed before one was consulted).
    """

    accepted: bool
    reason: OfflineReason | None
    detail: str
    stale: bool = False
    list_expires_at: int | None = None
    claims: OfflineClaims | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready object: result, reason, detail, stale, kit expiry, claims."""
        return {
            "result": "accepted" if self.accepted else "rejected",
            "reason": None if self.reason is None else self.reason.value,
            "detail": self.detail,
            "stale": self.stale,
            "status_list_expires_at": self.list_expires_at,
            "claims": None
            if self.claims is None
            else {
                "sealed_ref": self.claims.sealed_ref,
                "nonce": self.claims.nonce,
                "region": self.claims.region,
                "purpose": self.claims.purpose,
                "not_before": self.claims.not_before,
                "expires_at": self.claims.expires_at,
            },
        }


def _index_kits(kits: OfflineKit | Iterable[OfflineKit]) -> tuple[dict[str, OfflineKit], dict[bytes, PublicKey]]:
    """Kits by region and every kit's keys by kid; raise ValueError when kits contradict each other."""
    by_region: dict[str, OfflineKit] = {}
    keys: dict[bytes, PublicKey] = {}
    for kit in [kits] if isinstance(kits, OfflineKit) else kits:
        if kit.region in by_region:
            raise ValueError(f"two kits for region {kit.region}")
        by_region[kit.region] = kit
        for kid, key in kit.keys.items():
            if keys.setdefault(kid, key) != key:
                raise ValueError(f"kits disagree on the region of key {b64url(kid)}")
    return by_region, keys


def verify_offline(
    text: str,
    kits: OfflineKit | Iterable[OfflineKit],
    now: int,
    leeway: int,
    *,
    allow_stale: bool = False,
    lifetime: int = DEFAULT_LIFETIME,
) -> OfflineResult:
    """Decide a scan with the kits alone: the credential, then its region's kit.

    The credential is checked first (structure, key from any kit's JWKS, signature, window,
    with `leeway` seconds of clock skew and at most `lifetime` + `leeway` between nbf and exp,
    as the server checks it); then its region must have a kit, and that kit must not be stale
    (unless `allow_stale`). The card's status is not known offline (see the module docstring);
    single use is the gate's own business. Raise ValueError only when the kits contradict
    each other.
    """
    by_region, keys = _index_kits(kits)
    try:
        verified = verify_credential(text, keys, now, leeway, lifetime)
    except CredentialRejected as exc:
        return OfflineResult(accepted=False, reason=OfflineReason(exc.reason.value), detail=exc.detail)
    claims = verified.claims
    shown = OfflineClaims(
        sealed_ref=claims.sealed_ref.hex(),
        nonce=claims.nonce.hex(),
        region=claims.region,
        purpose=claims.purpose.label,
        not_before=claims.not_before,
        expires_at=claims.expires_at,
    )
    kit = by_region.get(claims.region)
    if kit is None:
        return OfflineResult(
            accepted=False,
            reason=OfflineReason.REGION_NOT_ACCEPTED,
            detail=f"no offline kit for region {claims.region}",
            claims=shown,
        )
    listing = kit.status_list
    stale = listing.is_stale(now, leeway)

    def decided(reason: OfflineReason | None, detail: str) -> OfflineResult:
        return OfflineResult(
            accepted=reason is None,
            reason=reason,
            detail=detail,
            stale=stale,
            list_expires_at=listing.expires_at,
            claims=shown,
        )

    if stale and not allow_stale:
        return decided(OfflineReason.STATUS_STALE, "the offline kit has expired")
    return decided(None, "accepted on a stale kit" if stale else "accepted")


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crypto.offline",
        description="Verify an eCard credential offline with a region's kit (JWKS + signed kit period).",
    )
    parser.add_argument("--kit", action="append", required=True, type=Path, help="offline kit JSON file (repeatable)")
    parser.add_argument("--now", type=int, help="verification time, seconds since the epoch (default: now)")
    parser.add_argument("--leeway", type=int, default=DEFAULT_LEEWAY, help="clock-skew allowance in seconds")
    parser.add_argument(
        "--lifetime",
        type=int,
        default=DEFAULT_LIFETIME,
        help="longest credential lifetime in seconds, as the service's ECARD_CREDENTIAL_LIFETIME",
    )
    parser.add_argument("--allow-stale", action="store_true", help="decide on an expired kit, flagged")
    parser.add_argument("credential", help="the scanned text, or - to read it from stdin")
    return parser


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the command line; return the exit status (0 accepted, 1 rejected, 2 bad usage or kit)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    parser = _parser()
    args = parser.parse_args(argv)
    if args.now is not None and args.now < 0:
        parser.error("--now must not be negative")
    if args.leeway < 0:
        parser.error("--leeway must not be negative")
    if args.lifetime < 0:
        parser.error("--lifetime must not be negative")
    kits = []
    for path in args.kit:
        try:
            kits.append(OfflineKit.from_json(path.read_bytes()))
        except (OSError, OfflineKitError) as exc:
            print(f"{parser.prog}: cannot use kit {path}: {exc}", file=sys.stderr)
            return 2
    text = stdin.read().rstrip("\r\n") if args.credential == "-" else args.credential
    now = int(time.time()) if args.now is None else args.now
    try:
        result = verify_offline(text, kits, now, args.leeway, allow_stale=args.allow_stale, lifetime=args.lifetime)
    except ValueError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()), file=stdout)
    return 0 if result.accepted else 1


if __name__ == "__main__":
    raise SystemExit(main())
