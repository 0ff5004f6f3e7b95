"""The base of every request and response body: msgspec Structs, strict about unknown fields."""

from __future__ import annotations

import msgspec


class WireModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A JSON body on the API. Unknown fields are an error, so a client's typo is not ignored."""
