"""Base45 (RFC 9285).

Written here rather than taken from PyPI: the codec is thirty lines, the available packages
are unmaintained single-file copies of the same thing, and the alphabet is exactly the QR
alphanumeric set, which is why credentials use it. Both directions run per credential on hot
paths (issuing, every scan), so the loops stay in C where they can: encoding looks each pair
of bytes up in a table of its three characters (65,536 entries, about 4 MB), decoding maps
characters to digits with one `bytes.translate` and combines the strided digit slices.
"""

from __future__ import annotations

import struct

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_INVALID = 0xFF
_DIGITS = bytes(ALPHABET.index(chr(b)) if chr(b) in ALPHABET else _INVALID for b in range(256))
_TRIPLETS = [ALPHABET[v % 45] + ALPHABET[v // 45 % 45] + ALPHABET[v // 2025] for v in range(0x10000)]


class Base45Error(ValueError):
    """The text is not valid Base45."""


def b45encode(data: bytes) -> str:
    """Encode bytes as Base45 text: each pair of bytes becomes three characters."""
    pairs = len(data) // 2
    text = "".join([_TRIPLETS[value] for value in struct.unpack_from(f">{pairs}H", data)])
    if len(data) % 2:
        text += ALPHABET[data[-1] % 45] + ALPHABET[data[-1] // 45]
    return text


def b45decode(text: str) -> bytes:
    """Decode Base45 text; raise `Base45Error` on a bad character, length or value."""
    if not text.isascii():
        raise Base45Error("Base45 text must be ASCII")
    digits = text.encode("ascii").translate(_DIGITS)
    if _INVALID in digits:
        bad = text[digits.index(_INVALID)]
        raise Base45Error(f"character {bad!r} is not in the Base45 alphabet")
    length = len(digits)
    if length % 3 == 1:
        raise Base45Error("Base45 text length leaves a dangling character")
    whole = length - length % 3
    values = [
        low + middle * 45 + high * 2025
        for low, middle, high in zip(digits[0:whole:3], digits[1:whole:3], digits[2:whole:3], strict=True)
    ]
    if values and max(values) > 0xFFFF:
        raise Base45Error("Base45 triplet encodes a value above 65535")
    out = struct.pack(f">{len(values)}H", *values)
    if whole != length:
        value = digits[whole] + digits[whole + 1] * 45
        if value > 0xFF:
            raise Base45Error("Base45 final pair encodes a value above 255")
        out += bytes((value,))
    return out
