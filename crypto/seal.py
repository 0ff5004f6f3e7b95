"""The card reference sealed per code: one 16-byte block no two codes share, that only the issuer opens.

A code must not carry anything common to two codes of one card but issuer, kid, purpose and
times (issue 13, item 4). The card reference is what the server needs back to find the card, so
a code carries it encrypted, in one block, with a key of its own:

    seal key   K = HKDF(secret of the issuer key, info = "ecard/card-ref-seal/v1" ‖ alg ‖ region ‖ kid)
    code input t = nonce ‖ nbf                     nbf as 4 big-endian bytes
    Ed25519 keys:  sealed ref = card_ref ⊕ HMAC-SHA256(K, t)[:16]
    SM2 keys:      sealed ref = SM4_k(card_ref), k = HMAC-SM3(K, t)[:16]   one raw SM4 block

For Ed25519 keys the seal is a one-time pad from a PRF: HMAC-SHA256 keyed with K gives each code
a 16-byte pad of its own, so nothing but a hash call and an XOR is spent per code (1.8 µs; a raw
AES-256 block under a per-code key took 5.3 µs, its cipher context built for one block). The
national profile keeps the national block cipher, SM4, for confidentiality, as the
commercial-cryptography assessment expects (SM2, SM3 and SM4 only); its cost disappears beside the
SM2 signature check. The seal key belongs to one issuer key (one key generation of one region): it
is derived from that key's secret with its own label, so it rotates with the signing key, needs no
secret of its own, and the verify path has it for every key it still accepts (retired ones
included, revoked ones not).

Why two seals of one reference differ: each code's block is encrypted under its own pad or key,
derived from the code's nonce (7 random bytes) and nbf, both signed in the same payload. Codes of one
card have pairwise distinct (nonce, nbf) except with probability about n² / 2^57 for n codes
sharing an nbf (a card gets a handful per second at most), so their pads (and keys) are independent
pseudorandom strings and so are the blocks. Neither construction needs a mode, IV or padding: the
block is exactly the 16-byte reference, and no other code ever uses the same pad or key.

What a watcher of many codes learns: the nonce, nbf and sealed block of each, which are
indistinguishable from random without K (HMAC as a PRF, SM4 as a PRP); nothing links two
codes of one card, nor tells codes of one card from codes of two. A repeated (nonce, nbf)
would give equal blocks for the same card, which is the one way a seal could link, and is the
collision bound above. Nobody but the issuer can open a block, and the signature over the
payload stops anyone from moving a block to another code (it would open to another reference,
or not be signed). The gate that holds the public keys verifies the code but cannot tell whose
it is: only the issuer's verify path resolves a code to its card.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEALED_LENGTH = 16
INFO = b"ecard/card-ref-seal/v1"
ED25519 = "Ed25519"
SM2 = "SM2"


def tweak(nonce: bytes, not_before: int) -> bytes:
    """The per-code input of the code key: the nonce and the nbf (4 bytes, big-endian), both signed."""
    return nonce + not_before.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class CardRefSeal:
    """One issuer key's seal: seals and opens 16-byte card references, one pad or key per code.

    `national` selects HMAC-SM3 and an SM4 block (SM2 keys) instead of an HMAC-SHA256 pad (Ed25519 keys).
    """

    key: bytes = field(repr=False)
    national: bool = False

    @classmethod
    def derive(cls, secret: bytes, algorithm: str, region: str, kid: bytes) -> CardRefSeal:
        """The seal of an issuer key, from its secret (crypto.algorithms.secret_of), algorithm, region and kid."""
        if algorithm not in (ED25519, SM2):
            raise ValueError(f"no card-reference seal for algorithm {algorithm!r}")
        national = algorithm == SM2
        hkdf = HKDF(
            algorithm=hashes.SM3() if national else hashes.SHA256(),
            length=32,
            salt=None,
            info=INFO + b"\x00" + algorithm.encode() + b"\x00" + region.encode() + b"\x00" + kid,
        )
        return cls(key=hkdf.derive(secret), national=national)

    def _pad(self, nonce: bytes, not_before: int) -> int:
        return int.from_bytes(hmac.digest(self.key, tweak(nonce, not_before), "sha256")[:SEALED_LENGTH])

    def _sm4(self, nonce: bytes, not_before: int) -> Cipher[modes.ECB]:
        code_key = hmac.digest(self.key, tweak(nonce, not_before), "sm3")[:16]
        # One block under a key no other code uses: ECB of a single block is the raw cipher.
        return Cipher(algorithms.SM4(code_key), modes.ECB())  # noqa: S305

    def seal(self, card_ref: bytes, nonce: bytes, not_before: int) -> bytes:
        """The 16-byte block a code carries for card_ref."""
        if len(card_ref) != SEALED_LENGTH:
            raise ValueError("a card reference has 16 bytes")
        if self.national:
            return self._sm4(nonce, not_before).encryptor().update(card_ref)
        return (int.from_bytes(card_ref) ^ self._pad(nonce, not_before)).to_bytes(SEALED_LENGTH)

    def open(self, sealed: bytes, nonce: bytes, not_before: int) -> bytes:
        """The card reference a code's block seals (any 16 bytes open to some reference: the signature
        is what makes the block the issuer's)."""
        if len(sealed) != SEALED_LENGTH:
            raise ValueError("a sealed card reference has 16 bytes")
        if self.national:
            return self._sm4(nonce, not_before).decryptor().update(sealed)
        return (int.from_bytes(sealed) ^ self._pad(nonce, not_before)).to_bytes(SEALED_LENGTH)
