"""Generate tests/vectors/credentials.json, the public test vectors of the eCard credential.

Everything is fixed — key seeds, times, card references, nonces — and Ed25519 signatures are
deterministic, so the output is byte-identical on every run. From the repository root:

    python tests/vectors/make_vectors.py           # (re)write credentials.json
    python tests/vectors/make_vectors.py --check   # exit 1 if the file is not what this produces
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from crypto.base45 import b45encode  # noqa: E402
from crypto.cose import sign1  # noqa: E402
from crypto.credential import (  # noqa: E402
    PREFIX,
    Claims,
    Purpose,
    issue_credential,
    seal_for,
)
from crypto.credential import encode_claims as encode_sealed  # noqa: E402
from crypto.jwk import jwks  # noqa: E402
from crypto.keys import SigningKey  # noqa: E402

OUTPUT = Path(__file__).with_name("credentials.json")

# Published issuer keys (seeds are public: these are test keys only) and one unpublished key.
ISSUER_SICHUAN = SigningKey.from_seed(bytes(range(32)))
ISSUER_CHONGQING = SigningKey.from_seed(bytes(range(64, 96)))
UNPUBLISHED = SigningKey.from_seed(bytes(range(32, 64)))
SICHUAN = "510000"
CHONGQING = "500000"

NOW = 1_750_000_000
LEEWAY = 10
LIFETIME = 60  # exp - nbf may be at most LIFETIME + LEEWAY
CARD_REF = bytes.fromhex("5ec0ca7d00112233445566778899aabb")
NONCE = bytes.fromhex("00010203040506")


def encode_claims(value: Claims, key: SigningKey = ISSUER_SICHUAN) -> bytes:
    """The payload key signs for value: the card reference sealed with key's seal for the claims' region."""
    return encode_sealed(value, seal_for(key, value.region))


def claims(**overrides: Any) -> Claims:
    fields: dict[str, Any] = {
        "card_ref": CARD_REF,
        "nonce": NONCE,
        "region": SICHUAN,
        "purpose": Purpose.TRANSIT,
        "not_before": NOW - 30,
        "expires_at": NOW + 30,
    }
    fields.update(overrides)
    return Claims(**fields)


def protected_header(kid: bytes, alg: int | None = -8) -> bytes:
    header: dict[int, Any] = {} if alg is None else {1: alg}
    header[4] = kid
    return cbor2.dumps(header)


def cose_sign1(
    key: SigningKey,
    payload: bytes,
    *,
    protected: bytes | None = None,
    unprotected: dict[Any, Any] | None = None,
    tagged: bool = True,
    signature: bytes | None = None,
) -> bytes:
    """A COSE_Sign1 assembled by hand (RFC 9052), signed over its Sig_structure unless given one."""
    if protected is None:
        protected = protected_header(key.kid)
    if signature is None:
        signature = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    items = [protected, {} if unprotected is None else unprotected, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(18, items) if tagged else items)


def text(raw: bytes) -> str:
    return PREFIX + b45encode(raw)


def expected_claims(value: Claims, key: SigningKey) -> dict[str, Any]:
    return {
        "iss": value.region,
        "exp": value.expires_at,
        "nbf": value.not_before,
        "cti": value.nonce.hex(),
        "sealed_ref": seal_for(key, value.region).seal(value.card_ref, value.nonce, value.not_before).hex(),
        "card_ref": value.card_ref.hex(),
        "purpose": int(value.purpose),
        "purpose_label": value.purpose.label,
        "payload_hex": encode_claims(value, key).hex(),
    }


def valid_case(name: str, description: str, key: SigningKey, value: Claims) -> dict[str, Any]:
    credential = issue_credential(key, value)
    return {
        "name": name,
        "description": description,
        "credential": credential,
        "expected": "valid",
        "kid_hex": key.kid.hex(),
        "cose_hex": sign1(key, encode_claims(value, key)).hex(),
        "claims": expected_claims(value, key),
    }


def rejected_case(name: str, description: str, credential: str, expected: str) -> dict[str, Any]:
    return {"name": name, "description": description, "credential": credential, "expected": expected}


def header_case(name: str, description: str, protected: bytes, unprotected: dict[Any, Any] | None = None) -> Any:
    """A malformed case whose only fault is its header: the rest is the valid case, correctly signed."""
    raw = cose_sign1(ISSUER_SICHUAN, encode_claims(claims()), protected=protected, unprotected=unprotected)
    return rejected_case(name, description + " (correctly signed)", text(raw), "malformed")


def header_cases() -> list[dict[str, Any]]:
    kid = ISSUER_SICHUAN.kid
    return [
        header_case(
            "malformed-crit-unknown-label",
            "protected header {1: -8, 4: kid, 2: [99], 99: 0}: crit names a header this profile does not know",
            cbor2.dumps({1: -8, 4: kid, 2: [99], 99: 0}),
        ),
        header_case(
            "malformed-crit-known-label",
            "protected header {1: -8, 4: kid, 2: [4]}: crit names kid; the header must be exactly alg and kid",
            cbor2.dumps({1: -8, 4: kid, 2: [4]}),
        ),
        header_case(
            "malformed-unknown-label",
            'protected header {1: -8, 4: kid, 99: "x"}: an unknown label',
            cbor2.dumps({1: -8, 4: kid, 99: "x"}),
        ),
        header_case(
            "malformed-alg-as-text",
            'protected header {1: "EdDSA", 4: kid}: alg must be the integer -8',
            cbor2.dumps({1: "EdDSA", 4: kid}),
        ),
        header_case(
            "malformed-extra-typ",
            'protected header {1: -8, 4: kid, 16: "application/cwt"}: the credential has no typ',
            cbor2.dumps({1: -8, 4: kid, 16: "application/cwt"}),
        ),
        header_case(
            "malformed-duplicate-kid",
            "protected header a3 01 27 04 48 <kid> 04 48 <kid>: a map with the kid twice",
            b"\xa3\x01\x27\x04\x48" + kid + b"\x04\x48" + kid,
        ),
        header_case(
            "malformed-non-canonical-kid-length",
            "protected header a2 01 27 04 58 08 <kid>: the kid's length in an extra byte",
            b"\xa2\x01\x27\x04\x58\x08" + kid,
        ),
        header_case(
            "malformed-kid-also-unprotected",
            "exact protected header, and the kid again in the unprotected header, which must be empty",
            protected_header(kid),
            {4: kid},
        ),
        header_case(
            "malformed-unprotected-not-empty",
            'exact protected header, unprotected header {99: "note"}: it must be empty',
            protected_header(kid),
            {99: "note"},
        ),
    ]


def cases() -> list[dict[str, Any]]:
    good = claims()
    good_payload = encode_claims(good)
    good_cose = cose_sign1(ISSUER_SICHUAN, good_payload)
    signature = cbor2.loads(good_cose).value[3]
    flipped = bytes([signature[0] ^ 0x01]) + signature[1:]
    sealed = cbor2.loads(good_payload)[-65537][0]
    bad_purpose = cbor2.loads(good_payload)
    bad_purpose[-65537] = [sealed, 9]
    old_card_claim = cbor2.loads(good_payload)
    old_card_claim[-65537] = [CARD_REF, 1, 1_000_000]
    short_sealed = cbor2.loads(good_payload)
    short_sealed[-65537] = [sealed[:15], 1]

    return [
        valid_case("valid", "transit credential inside its window", ISSUER_SICHUAN, good),
        valid_case(
            "valid-other-issuer",
            "medical credential of another region, signed by that region's key",
            ISSUER_CHONGQING,
            claims(region=CHONGQING, purpose=Purpose.MEDICAL),
        ),
        valid_case(
            "valid-expiry-edge",
            "now == exp + leeway: still valid",
            ISSUER_SICHUAN,
            claims(not_before=NOW - LEEWAY - 60, expires_at=NOW - LEEWAY, purpose=Purpose.LIBRARY),
        ),
        valid_case(
            "valid-largest",
            "every value at its longest: 139 bytes, 213 characters",
            ISSUER_SICHUAN,
            claims(
                card_ref=b"\xff" * 16,
                nonce=b"\xff" * 7,
                purpose=Purpose.GENERAL,
                # Times of 4 CBOR bytes, as every time from 2106 back to 1970 + 18 hours.
                not_before=NOW - LEEWAY,
                expires_at=NOW + LIFETIME,
            ),
        ),
        valid_case(
            "valid-lifetime-edge",
            "exp - nbf == lifetime + leeway: still valid",
            ISSUER_SICHUAN,
            claims(not_before=NOW - 40, expires_at=NOW - 40 + LIFETIME + LEEWAY),
        ),
        valid_case(
            "valid-not-before-edge",
            "now + leeway == nbf: already valid",
            ISSUER_SICHUAN,
            claims(not_before=NOW + LEEWAY, expires_at=NOW + LEEWAY + 60, purpose=Purpose.PARK),
        ),
        rejected_case(
            "malformed-no-prefix",
            "valid COSE_Sign1 without the EC1: prefix",
            b45encode(good_cose),
            "malformed",
        ),
        rejected_case(
            "malformed-base45",
            "lower-case letters are not in the Base45 alphabet",
            PREFIX + b45encode(good_cose).lower(),
            "malformed",
        ),
        rejected_case(
            "malformed-untagged",
            "COSE_Sign1 array without CBOR tag 18 (correctly signed)",
            text(cose_sign1(ISSUER_SICHUAN, good_payload, tagged=False)),
            "malformed",
        ),
        rejected_case(
            "malformed-wrong-alg",
            "protected header names ES256 (-7) instead of EdDSA (-8)",
            text(cose_sign1(ISSUER_SICHUAN, good_payload, protected=protected_header(ISSUER_SICHUAN.kid, -7))),
            "malformed",
        ),
        rejected_case(
            "malformed-missing-kid",
            "protected header without a kid (correctly signed)",
            text(cose_sign1(ISSUER_SICHUAN, good_payload, protected=cbor2.dumps({1: -8}))),
            "malformed",
        ),
        rejected_case(
            "malformed-trailing-bytes",
            "one byte (0x00) after the COSE_Sign1",
            text(good_cose + b"\x00"),
            "malformed",
        ),
        rejected_case(
            "malformed-unknown-purpose",
            "correctly signed claims with purpose 9, which is not defined",
            text(cose_sign1(ISSUER_SICHUAN, cbor2.dumps(bad_purpose))),
            "malformed",
        ),
        rejected_case(
            "malformed-linkable-card-claim",
            "correctly signed claims with [card_ref, purpose, status_index]: the linkable layout of EC1 before",
            text(cose_sign1(ISSUER_SICHUAN, cbor2.dumps(old_card_claim))),
            "malformed",
        ),
        rejected_case(
            "malformed-short-sealed-ref",
            "correctly signed claims whose sealed card reference has 15 bytes",
            text(cose_sign1(ISSUER_SICHUAN, cbor2.dumps(short_sealed))),
            "malformed",
        ),
        *header_cases(),
        rejected_case(
            "unknown-key",
            "signed by a key that is not in the JWKS",
            issue_credential(UNPUBLISHED, good),
            "unknown_key",
        ),
        rejected_case(
            "bad-signature-flipped-bit",
            "lowest bit of the first signature byte flipped",
            text(cose_sign1(ISSUER_SICHUAN, good_payload, signature=flipped)),
            "bad_signature",
        ),
        rejected_case(
            "bad-signature-altered-payload",
            "exp moved one hour later after signing",
            text(cose_sign1(ISSUER_SICHUAN, encode_claims(claims(expires_at=NOW + 3600)), signature=signature)),
            "bad_signature",
        ),
        rejected_case(
            "bad-signature-region-mismatch",
            "iss 510000 but signed by the key published for region 500000",
            issue_credential(ISSUER_CHONGQING, good),
            "bad_signature",
        ),
        rejected_case(
            "expired",
            "now == exp + leeway + 1",
            issue_credential(ISSUER_SICHUAN, claims(not_before=NOW - LEEWAY - 61, expires_at=NOW - LEEWAY - 1)),
            "expired",
        ),
        rejected_case(
            "not-yet-valid",
            "now + leeway == nbf - 1",
            issue_credential(ISSUER_SICHUAN, claims(not_before=NOW + LEEWAY + 1, expires_at=NOW + LEEWAY + 61)),
            "not_yet_valid",
        ),
        rejected_case(
            "lifetime-exceeded",
            "exp - nbf == lifetime + leeway + 1, though now is inside [nbf, exp]",
            issue_credential(ISSUER_SICHUAN, claims(not_before=NOW - 40, expires_at=NOW - 40 + LIFETIME + LEEWAY + 1)),
            "lifetime_exceeded",
        ),
        rejected_case(
            "lifetime-exceeded-a-year",
            "correctly signed by a published key, valid from now for a year",
            issue_credential(ISSUER_SICHUAN, claims(not_before=NOW, expires_at=NOW + 365 * 86_400)),
            "lifetime_exceeded",
        ),
    ]


def build() -> dict[str, Any]:
    return {
        "description": (
            "Test vectors for the eCard credential: EC1:<base45(COSE_Sign1, CBOR tag 18)> carrying a "
            "CWT signed with EdDSA (Ed25519), protected header exactly {1: -8, 4: kid} in canonical "
            "CBOR, unprotected header empty. Verify every credential against the JWKS at time `now` "
            "(seconds since the epoch) allowing `leeway` seconds of clock skew on both ends of "
            "[nbf, exp], and exp - nbf at most `lifetime` + `leeway`."
        ),
        "claims_layout": {
            "1": "iss: issuing region, 6-digit GB/T 2260 code; must equal the key's `region`",
            "4": "exp",
            "5": "nbf",
            "7": "cti: 7-byte nonce",
            "-65537": (
                "[sealed_ref (16 bytes: the card reference sealed for this code, see `seals`), "
                "purpose (1 transit, 2 medical, 3 park, 4 library, 5 general)]"
            ),
        },
        "seals": {
            "description": (
                "The issuer's card-reference seal of each kid (test keys: their seeds are public). "
                "seal_key = HKDF-SHA256(ikm = the Ed25519 seed, salt = none, info = "
                "'ecard/card-ref-seal/v1' 00 'Ed25519' 00 region 00 kid, 32 bytes); per code "
                "pad = the first 16 bytes of HMAC-SHA256(seal_key, cti || nbf as 4 big-endian bytes); "
                "sealed_ref = card_ref XOR pad. "
                "Only the issuer holds these; a verifier with the JWKS alone checks everything else."
            ),
            "keys": {
                key.kid.hex(): {"region": region, "seal_key_hex": seal_for(key, region).key.hex()}
                for key, region in ((ISSUER_SICHUAN, SICHUAN), (ISSUER_CHONGQING, CHONGQING))
            },
        },
        "now": NOW,
        "leeway": LEEWAY,
        "lifetime": LIFETIME,
        "jwks": jwks([ISSUER_SICHUAN.verify_key(SICHUAN), ISSUER_CHONGQING.verify_key(CHONGQING)]),
        "cases": cases(),
    }


def render() -> str:
    """The file's exact text."""
    return json.dumps(build(), indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    content = render()
    if args.check:
        current = OUTPUT.read_bytes() if OUTPUT.exists() else None
        if current != content.encode("utf-8"):
            print(f"{OUTPUT} is out of date; run {Path(__file__).name} to regenerate it", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_bytes(content.encode("utf-8"))
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
