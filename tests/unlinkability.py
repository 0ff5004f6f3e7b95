"""What two codes of one card may share (issue 13, item 4): the check the unit and integration tests share.

A code is taken apart completely: the COSE_Sign1 must re-encode to exactly its bytes from the parts
read here, so no byte hides outside them. The parts are then either allowed to repeat — the protected
header (alg, kid), iss, exp, nbf and purpose — or must be the code's own: the nonce, the sealed card
reference and the signature. No 8-byte string of those may occur in two codes (for random values the
chance that two of 60 codes share one by accident is about 10^-10).
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from crypto.base45 import b45decode
from crypto.credential import PREFIX

WINDOW = 8


@dataclass(frozen=True)
class Anatomy:
    """A code's parts: those that may repeat across codes, and those that must be its own."""

    allowed: tuple[bytes, str, int, int, int]  # protected header, iss, exp, nbf, purpose
    own: tuple[bytes, bytes, bytes]  # nonce, sealed reference, signature


def anatomy(code: str) -> Anatomy:
    """Take a code apart, asserting that nothing is in it but the profile's fields."""
    assert code.startswith(PREFIX)
    raw = b45decode(code[len(PREFIX) :])
    message = cbor2.loads(raw)
    assert isinstance(message, cbor2.CBORTag) and message.tag == 18
    protected, unprotected, payload, signature = message.value
    assert unprotected == {}
    assert set(cbor2.loads(protected)) == {1, 4}
    claims = cbor2.loads(payload)
    assert set(claims) == {1, 4, 5, 7, -65537}
    sealed, purpose = claims[-65537]
    assert isinstance(sealed, bytes) and len(sealed) == 16 and type(purpose) is int
    rebuilt_payload = cbor2.dumps({1: claims[1], 4: claims[4], 5: claims[5], 7: claims[7], -65537: [sealed, purpose]})
    assert rebuilt_payload == payload
    assert cbor2.dumps(cbor2.CBORTag(18, [protected, {}, rebuilt_payload, signature])) == raw
    return Anatomy((protected, claims[1], claims[4], claims[5], purpose), (claims[7], sealed, signature))


def assert_unlinkable(codes: list[str], *forbidden: bytes) -> list[Anatomy]:
    """No byte string of WINDOW bytes of a code's own parts is in any other code; nor any of `forbidden`
    (the card's reference in clear, say) in any code at all."""
    parts = [anatomy(code) for code in codes]
    seen: dict[bytes, int] = {}
    for index, part in enumerate(parts):
        for value in part.own:
            for start in range(len(value) - WINDOW + 1):
                window = value[start : start + WINDOW]
                owner = seen.setdefault(window, index)
                assert owner == index, f"codes {owner} and {index} share {window.hex()}"
    for code in codes:
        raw = b45decode(code[len(PREFIX) :])
        for value in forbidden:
            assert value not in raw
    return parts
