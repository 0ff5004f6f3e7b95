"""Fresh credentials for the gates: each one issued through the API, handed out once, never stale.

A credential is single-use and lives about a minute, so a gate cannot scan the same one twice or
one issued long before. `CredentialSupply` keeps what was issued, keyed by when each becomes
valid and when it runs out, and hands out the one closest to its end first. `Supplier` keeps it
stocked from greenlets of their own: before the run (`prefill`) and during it, only as much as the
running gates need for the next few seconds.

Bundles (`count` > 1) are cheaper per credential, but item i only becomes valid 30·i s after
issue, so the bundle size follows the time left in the run: a short run gets single credentials.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import gevent
import gevent.event
import gevent.pool
import msgspec
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment

from loadtests.scenarios.holders import HolderSession

logger = logging.getLogger("ecard.supply")

SUPPLY_NAME = "/v1/holder/credentials [supply]"
# A credential is not handed out in the last seconds of its life (the scan must still reach the server).
EXPIRY_MARGIN = 2.0
# The stock the supplier keeps: this many seconds of the gates' demand, and at least MIN_STOCK.
BUFFER_SECONDS = 3.0
MIN_STOCK = 20
IDLE_PAUSE = 0.05
ERROR_PAUSE = 0.5
MAX_BUNDLE = 20
# Bundle item i becomes valid this many seconds after item i-1 (the service's refresh interval).
WINDOW_STEP = 30.0


class Bundle(msgspec.Struct):
    """The part of `POST /v1/holder/credentials`'s answer the supply reads."""

    server_time: datetime
    credentials: list[Item]


class Item(msgspec.Struct):
    """One issued credential."""

    credential: str
    not_before: datetime
    expires_at: datetime


_bundle_decoder = msgspec.json.Decoder(Bundle)


class SupplyError(Exception):
    """No fresh credential came in time: the supply could not keep up with the gates."""


@dataclass(order=True)
class _Fresh:
    until: float
    text: str = field(compare=False)


@dataclass(order=True)
class _Upcoming:
    since: float
    fresh: _Fresh = field(compare=False)


class CredentialSupply:
    """Issued credentials, each handed out at most once, while valid.

    Times are this machine's epoch seconds (translated from the server's clock when added).
    Greenlets share it without locks: nothing in here yields.
    """

    def __init__(self, margin: float = EXPIRY_MARGIN, clock: Callable[[], float] = time.time) -> None:
        self._margin = margin
        self._clock = clock
        self._ready: list[_Fresh] = []
        self._upcoming: list[_Upcoming] = []
        self._added = gevent.event.Event()
        self.added = 0
        self.taken = 0
        self.expired = 0
        self.waits = 0
        self.longest_wait = 0.0

    def add(self, text: str, valid_from: float, valid_until: float) -> None:
        """A credential valid from valid_from until valid_until."""
        fresh = _Fresh(valid_until - self._margin, text)
        self.added += 1
        if valid_from <= self._clock():
            heapq.heappush(self._ready, fresh)
            self._added.set()
        else:
            heapq.heappush(self._upcoming, _Upcoming(valid_from, fresh))

    def _promote(self, now: float) -> None:
        while self._upcoming and self._upcoming[0].since <= now:
            heapq.heappush(self._ready, heapq.heappop(self._upcoming).fresh)

    def _drop_stale(self, now: float) -> None:
        while self._ready and self._ready[0].until <= now:
            heapq.heappop(self._ready)
            self.expired += 1

    def take(self) -> str | None:
        """The valid credential closest to its end, or None."""
        now = self._clock()
        self._promote(now)
        self._drop_stale(now)
        if not self._ready:
            return None
        self.taken += 1
        return heapq.heappop(self._ready).text

    def take_wait(self, timeout: float) -> str:
        """A valid credential, waiting up to timeout seconds for one; SupplyError when none came."""
        text = self.take()
        if text is not None:
            return text
        self.waits += 1
        started = time.monotonic()
        deadline = started + timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.longest_wait = max(self.longest_wait, now - started)
                raise SupplyError(f"no fresh credential within {timeout:g} s (the supply could not keep up)")
            self._added.clear()
            # Upcoming credentials become valid without an add: look again at least every 100 ms.
            self._added.wait(min(deadline - now, 0.1))
            text = self.take()
            if text is not None:
                self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                return text

    def stock(self) -> int:
        """Credentials valid now.

        Bundle items that become valid later do not count: they arrive on whole seconds, in
        batches, and a stock waiting for them would let the gates run dry in between.
        """
        now = self._clock()
        self._promote(now)
        self._drop_stale(now)
        return len(self._ready)

    def summary(self) -> dict[str, float | int]:
        """What went through the supply."""
        return {
            "issued": self.added,
            "handed_out": self.taken,
            "expired_unused": self.expired,
            "left": len(self._ready) + len(self._upcoming),
            "gate_waits": self.waits,
            "longest_wait_s": round(self.longest_wait, 3),
        }


def bundle_for(seconds_left: float | None, configured: int) -> int:
    """Credentials per issue request: configured, or (0) as many as the rest of the run can use."""
    if configured > 0:
        return min(configured, MAX_BUNDLE)
    if seconds_left is None:
        return 4
    return max(1, min(MAX_BUNDLE, 1 + math.floor((seconds_left - 5.0) / WINDOW_STEP)))


class Supplier:
    """Greenlets that keep a CredentialSupply stocked through `POST /v1/holder/credentials`."""

    def __init__(
        self,
        environment: Environment,
        host: str,
        holders: list[HolderSession],
        supply: CredentialSupply,
        demand: Callable[[], float],
        connections: int,
        bundle: int,
        token_max_age: float,
        ends_at: float | None,
    ) -> None:
        self.environment = environment
        self.host = host
        self.holders = holders
        self.supply = supply
        self.demand = demand
        self.connections = max(1, connections)
        self.bundle = bundle
        self.token_max_age = token_max_age
        self.ends_at = ends_at
        # Answered issue requests (a request cut off when the run stops is not counted) and failed ones.
        self.requests = 0
        self.failures = 0
        self.prefilled = 0
        self.prefill_seconds = 0.0
        self._next_holder = itertools.count()
        self._group = gevent.pool.Group()

    def _session(self) -> FastHttpSession:
        return FastHttpSession(self.host, self.environment.events.request, None, concurrency=1, network_timeout=30.0)

    def issue(self, client: FastHttpSession, count: int) -> bool:
        """One request for count credentials of the next supply card; whether it worked."""
        holder = self.holders[next(self._next_holder) % len(self.holders)]
        holder.refresh_if_older(client, self.token_max_age)
        body = msgspec.json.encode({"purpose": "transit", "count": count})
        sent = time.time()
        with client.post(
            "/v1/holder/credentials",
            data=body,
            headers=holder.auth("POST", "/v1/holder/credentials"),
            name=SUPPLY_NAME,
            catch_response=True,
        ) as response:
            self.requests += 1
            if response.status_code != 200:
                response.failure(f"supply: HTTP {response.status_code}")
                self.failures += 1
                return False
            received = time.time()
            try:
                bundle = _bundle_decoder.decode(response.content)
            except msgspec.DecodeError as exc:
                response.failure(f"supply: undecodable answer ({exc})")
                self.failures += 1
                return False
            if len(bundle.credentials) != count:
                response.failure(f"supply: asked for {count} credentials, got {len(bundle.credentials)}")
                self.failures += 1
                return False
        # Translate the server's clock to ours (the request's midpoint stands for server_time).
        offset = (sent + received) / 2 - bundle.server_time.timestamp()
        for item in bundle.credentials:
            self.supply.add(item.credential, item.not_before.timestamp() + offset, item.expires_at.timestamp() + offset)
        return True

    def _wanted(self) -> float:
        return max(MIN_STOCK, self.demand() * BUFFER_SECONDS)

    def _keep_stocked(self) -> None:
        client = self._session()
        while True:
            if self.supply.stock() >= self._wanted():
                gevent.sleep(IDLE_PAUSE)
                continue
            left = self.ends_at - time.time() if self.ends_at is not None else None
            try:
                issued = self.issue(client, bundle_for(left, self.bundle))
            except Exception as exc:
                # A supplier greenlet must not die quietly: count it as a failure and go on.
                logger.exception("credential supply request failed")
                self._report_error(exc)
                issued = False
            if not issued:
                gevent.sleep(ERROR_PAUSE)

    def _report_error(self, exc: Exception) -> None:
        self.failures += 1
        self.environment.events.request.fire(
            request_type="POST", name=SUPPLY_NAME, response_time=0, response_length=0, exception=exc, context={}
        )

    def start(self) -> None:
        """Start stocking (until stop)."""
        for _ in range(self.connections):
            self._group.spawn(self._keep_stocked)

    def stop(self) -> None:
        """Stop the greenlets."""
        self._group.kill(block=True, timeout=5)

    def prefill(self, count: int) -> float:
        """Issue count single credentials now, before any gate runs; the seconds it took."""
        started = time.monotonic()
        remaining = itertools.count()
        # Each greenlet takes request numbers until count are taken; a failure stops the prefill.
        failed: list[bool] = []

        def work() -> None:
            client = self._session()
            while not failed and next(remaining) < count:
                if not self.issue(client, 1):
                    failed.append(True)

        group = gevent.pool.Group()
        for _ in range(self.connections):
            group.spawn(work)
        group.join()
        if failed:
            raise SupplyError("prefill: issuing credentials failed (see the failures table)")
        self.prefilled += count
        self.prefill_seconds += time.monotonic() - started
        return time.monotonic() - started
