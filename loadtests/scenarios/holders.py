"""Holder sessions during a run, and pools that lend terminals and cards to one user at a time."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

import gevent.lock
import msgspec
from locust.contrib.fasthttp import FastHttpSession

from crypto.dpop import make_proof
from crypto.keys import b64url_decode
from loadtests.scenarios.fixture import HolderEntry

TOKEN_NAME = "/v1/holder/token"
# Refresh an access token this long before it runs out, whatever the configured age.
EXPIRY_GUARD = 60.0

T = TypeVar("T")


class _Tokens(msgspec.Struct):
    access_token: str
    refresh_token: str
    expires_in: float


_tokens_decoder = msgspec.json.Decoder(_Tokens)


class HolderSession:
    """A card's session while a run uses it; its access token is refreshed before it gets old.

    Refresh tokens are single-use (a reused one revokes the whole family), so refreshing is
    serialised per session. The tokens are bound to the card's device key (DPoP): every request
    carries a new proof signed by it, for its method and URL (`base_url` + path), as a phone's do.
    """

    def __init__(self, entry: HolderEntry, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.device = b64url_decode(entry.device_key)
        self.card_number = entry.card_number
        self.name = entry.name
        self.access_token = entry.access_token
        self.refresh_token = entry.refresh_token
        self.issued_at = entry.issued_at
        self.expires_in = entry.expires_in
        self.refreshes = 0
        # Set by a hospital desk on the card's first visit.
        self.pin_set = False
        self._lock = gevent.lock.Semaphore()

    def proof(self, method: str, path: str, access_token: str | None = None) -> str:
        """A new DPoP proof for one request to `path` (about 60 µs of client CPU)."""
        url = self.base_url + path
        return make_proof(self.device, method, url, jti=secrets.token_urlsafe(12), access_token=access_token)

    def auth(self, method: str, path: str) -> dict[str, str]:
        """Headers of one JSON request made with this session: its access token and a proof for the request."""
        return {
            "Authorization": f"DPoP {self.access_token}",
            "DPoP": self.proof(method, path, self.access_token),
            "Content-Type": "application/json",
        }

    def _stale(self, max_age: float) -> bool:
        age = time.time() - self.issued_at
        return age >= max_age or age >= self.expires_in - EXPIRY_GUARD

    def refresh_if_older(self, client: FastHttpSession, max_age: float) -> None:
        """Rotate the tokens (POST /v1/holder/token) when the access token is older than max_age seconds."""
        if not self._stale(max_age):
            return
        with self._lock:
            if not self._stale(max_age):
                return
            body = msgspec.json.encode({"refresh_token": self.refresh_token})
            headers = {"Content-Type": "application/json", "DPoP": self.proof("POST", "/v1/holder/token")}
            with client.post("/v1/holder/token", data=body, headers=headers, name=TOKEN_NAME, catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"token refresh: HTTP {r.status_code}")
                    return
                tokens = _tokens_decoder.decode(r.content)
            self.access_token, self.refresh_token = tokens.access_token, tokens.refresh_token
            self.issued_at, self.expires_in = time.time(), tokens.expires_in
            self.refreshes += 1


class Pool(Generic[T]):
    """Things lent to one user at a time (a terminal, a card) and given back when it stops."""

    def __init__(self, items: Iterable[T]) -> None:
        self._free: deque[T] = deque(items)
        self.size = len(self._free)

    def lend(self) -> T | None:
        """A free item, or None when all are lent."""
        return self._free.popleft() if self._free else None

    def give_back(self, item: T) -> None:
        """Return a lent item."""
        self._free.append(item)
