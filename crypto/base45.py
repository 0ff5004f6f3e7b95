"""Base45 (RFC 9285).

Written here rather than taken from PyPI: the codec is thirty lines, the available packages
are unmaintained single-file copies of the same thing, and the alphabet is exactly the QR
alphanumeric set, which is why credentials use it. Decoding runs on every scan, so
characters are mapped to digit values with one `bytes.translate` call.
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_INVALID = 0xFF
_DIGITS = bytes(ALPHABET.index(chr(b)) if chr(b) in ALPHABET else _INVALID for b in range(256))


class Base45Error(ValueError):
    """The text is not valid Base45."""


def b45encode(data: bytes) -> str:
    """Encode bytes as Base45 text: each pair of bytes becomes three characters."""
    alphabet = ALPHABET
    out: list[str] = []
    for i in range(0, len(data) - 1, 2):
        value = (data[i] << 8) | data[i + 1]
        out.append(alphabet[value % 45] + alphabet[value // 45 % 45] + alphabet[value // 2025])
    if len(data) % 2:
        out.append(alphabet[data[-1] % 45] + alphabet[data[-1] // 45])
    return "".join(out)


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
    out = bytearray()
    whole = length - length % 3
    for i in range(0, whole, 3):
        value = digits[i] + digits[i + 1] * 45 + digits[i + 2] * 2025
        if value > 0xFFFF:
            raise Base45Error("Base45 triplet encodes a value above 65535")
        out.append(value >> 8)
        out.append(value & 0xFF)
    if whole != length:
        value = digits[whole] + digits[whole + 1] * 45
        if value > 0xFF:
            raise Base45Error("Base45 final pair encodes a value above 255")
        out.append(value)
    return bytes(out)
