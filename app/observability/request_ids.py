"""One id per request: the trusted proxy's `X-Request-Id`, or a new one; read by logs, problems and spans."""

from __future__ import annotations

import ipaddress
import os
import re
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litestar.types import Scope

HEADER = b"x-request-id"
# The request being answered in this task (set by app.server.request_observer, None outside a request).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# A proxy's id is taken as it is only when it cannot carry anything else: a log line, a card number.
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{8,64}")
# Peers seen, trusted or not: a deployment has few proxies, and the cache is cleared when it grows.
_PEER_CACHE_MAX = 4096


def new_request_id() -> str:
    """16 random hex digits: unique enough to find one request in a day's logs, cheap to make."""
    return os.urandom(8).hex()


class RequestIds:
    """Chooses each request's id: a trusted proxy's, when it sent an acceptable one; otherwise a new one."""

    __slots__ = ("_networks", "_trusted")

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._networks = tuple(ipaddress.ip_network(network) for network in trusted_proxies)
        self._trusted: dict[str, bool] = {}

    def of(self, scope: Scope) -> str:
        """The id of the request whose scope this is."""
        if self._networks and self._from_proxy(scope):
            for name, value in scope["headers"]:
                if name == HEADER:
                    given = value.decode("latin-1")
                    if _ACCEPTABLE.fullmatch(given):
                        return given
                    break
        return new_request_id()

    def _from_proxy(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client:
            return False
        peer = client[0]
        trusted = self._trusted.get(peer)
        if trusted is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                trusted = False
            else:
                trusted = any(address in network for network in self._networks)
            if len(self._trusted) >= _PEER_CACHE_MAX:
                self._trusted.clear()
            self._trusted[peer] = trusted
        return trusted
