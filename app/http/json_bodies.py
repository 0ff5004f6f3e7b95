"""Strict JSON request bodies: `application/json` only, each key once, nesting the decoder survives.

Every route that takes a JSON `data:` body reads it through `StrictJsonRequest.json` (the app's
request class), and the hot paths (app/http/hot_paths.py) check the same rules before they answer, so
a body is judged the same way wherever it lands:

- 415 unless the Content-Type is `application/json` (parameters allowed; a charset, if given, must
  be UTF-8, the only encoding of JSON, RFC 8259 §8.1). `application/*+json` is refused too: no
  client of this API sends one, and a cross-site form can send none of them without a preflight.
- 400 for JSON that msgspec cannot decode, including nesting so deep that decoding would exhaust
  the stack (msgspec raises RecursionError, which used to become a 500).
- 400 for a key given twice in one object, at any depth, compared after unescaping
  (`"cred\\u0065ntial"` is `credential`): a last-one-wins decoder would otherwise let a body say
  two things to two readers.
- 400 for a NUL (`\\u0000`) in any string or key (app.http.nul_text: PostgreSQL cannot store one).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from litestar import Request
from litestar.types import Empty

from app.domain import errors
from app.http import problems
from app.http.nul_text import contains_nul

JSON_MEDIA_TYPE = "application/json"


class DuplicateKeyError(ValueError):
    """An object of the body names one key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


# The stdlib decoder is the one that shows every key of an object (msgspec keeps the last); it only
# runs on bodies msgspec already accepted, so its laxer grammar (NaN, lone surrogates) never decides.
_decode_pairs = json.JSONDecoder(object_pairs_hook=_pairs_without_duplicates).decode
_decode = msgspec.json.Decoder().decode


def is_json_content_type(value: str | bytes) -> bool:
    """True for `application/json` with no charset or a UTF-8 one: what every JSON route accepts."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    media_type, _, parameters = text.partition(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        return False
    for parameter in parameters.split(";"):
        name, _, setting = parameter.partition("=")
        if name.strip().lower() == "charset" and setting.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def duplicate_key(body: bytes) -> str | None:
    """The first key that an object of the (already decodable) body names twice, else None."""
    try:
        _decode_pairs(body.decode("utf-8"))
    except DuplicateKeyError as exc:
        return exc.key
    return None


def decode_json_body(body: bytes) -> Any:
    """The body as plain values; a 400 problem for malformed JSON, nesting too deep, a duplicate key or a NUL."""
    try:
        value = _decode(body)
        key = duplicate_key(body)
    except msgspec.DecodeError as exc:
        raise errors.Invalid(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise errors.Invalid("the JSON body is nested too deeply") from None
    if key is not None:
        raise errors.Invalid(f"the JSON body gives the key {key!r} more than once")
    # A NUL can only come escaped (JSON refuses raw control characters), so most bodies skip the walk.
    if b"\\u0000" in body and contains_nul(value):
        raise errors.Invalid("text in the JSON body must not contain U+0000 (NUL)")
    return value


def refuse_unless_json(content_type: str) -> None:
    """415 problem unless the request says its body is `application/json`."""
    if not is_json_content_type(content_type):
        raise problems.problem(
            415,
            "unsupported_media_type",
            "send the body as 'Content-Type: application/json' (UTF-8)",
        )


class StrictJsonRequest(Request[Any, Any, Any]):
    """The app's request class: a JSON `data:` body is read by the rules above, on every route."""

    async def json(self) -> Any:
        """The JSON body, decoded once per request; 415 or 400 problems as the module says."""
        if self._json is Empty:
            if (cached := self._connection_state.json) is not Empty:
                self._json = cached
            else:
                refuse_unless_json(self.headers.get("content-type", ""))
                self._json = self._connection_state.json = decode_json_body(await self.body() or b"null")
        return self._json
