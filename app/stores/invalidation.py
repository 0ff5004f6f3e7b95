"""Tells every worker that operator data its caches hold has changed.

Workers keep terminals and keys in memory so `/v1/verify` never reads the database; when an
operator changes them, the worker that made the change publishes a message and every worker
(itself included) reloads. A periodic full reload covers a message lost while a worker was
disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

Listener = Callable[[str], Awaitable[None]]


class InvalidationBus(Protocol):
    """Publish a change; run a listener for changes published anywhere."""

    async def publish(self, topic: str) -> None:
        """Announce that data under topic changed."""
        ...

    async def run(self, listener: Listener) -> None:
        """Call listener for every announcement until cancelled."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class LocalInvalidationBus:
    """One process: announcements go straight to the listener."""

    def __init__(self) -> None:
        self._listener: Listener | None = None

    async def publish(self, topic: str) -> None:
        """See `InvalidationBus.publish`."""
        if self._listener is not None:
            await self._listener(topic)

    async def run(self, listener: Listener) -> None:
        """See `InvalidationBus.run`."""
        self._listener = listener
        try:
            await asyncio.Event().wait()
        finally:
            self._listener = None

    async def close(self) -> None:
        """Nothing to release."""


class RedisInvalidationBus:
    """Redis pub/sub on one channel; reconnects after an outage."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel

    async def publish(self, topic: str) -> None:
        """See `InvalidationBus.publish`; a failure is logged, the periodic reload catches up."""
        try:
            await self._client.publish(self._channel, topic)
        except (RedisError, OSError):
            logger.warning("could not publish cache invalidation %s", topic)

    async def run(self, listener: Listener) -> None:
        """See `InvalidationBus.run`."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # redis-py can swallow a cancellation that arrives inside subscribe(): honour it here,
                # or the task would go on listening and a shutdown would wait for it for ever.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                # Anything may have changed while we were not subscribed.
                await listener("*")
                async for message in pubsub.listen():
                    data = message.get("data")
                    await listener(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError):
                logger.warning("cache invalidation channel lost; retrying in 1 s")
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2

    async def close(self) -> None:
        """See `InvalidationBus.close`."""
        await self._client.aclose()
