"""A request's database session gives its connection back however the request ends, refusals included.

Litestar 2 cleans up generator dependencies only when every dependency of the handler resolved: a
session opened beside a caller that answered 401, or before a card that answered 404, used to keep
its pool connection until the garbage collector found it (app/server/context.py, `db_session`), and
SQLAlchemy then warned that it was cleaning up a connection nobody checked in. This test makes more
refusals than the pool holds and fails on any such warning, or on a pool that does not drain.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings

import httpx

from app.server.context import ServiceContext
from tests import factories
from tests.factories import bearer, problem

REFUSALS = 25  # more than the pool holds (10 + 10 overflow), so a leak would also stall the last ones


async def pool_drained(context: ServiceContext) -> bool:
    """Whether every pooled connection is back (the background loops hold theirs for milliseconds)."""
    for _ in range(100):
        if context.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
            return True
        await asyncio.sleep(0.02)
    return False


async def test_refusals_while_dependencies_resolve_return_their_connections(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, "510000")
    assert await pool_drained(context)
    pool = context.engine.pool
    out_after_refusals: list[int] = []
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(REFUSALS):
            # The card a path names is looked up with the request's session, then refused: 404 (with and
            # without the audit actor beside it), and a holder token the holder dependency refuses: 401.
            card = f"/v1/operator/cards/{uuid.uuid4()}"
            loss = await client.post(f"{card}/loss", json={"reason": "lost"}, headers=bearer(admin_token), timeout=10)
            out_after_refusals.append(pool.checkedout())  # type: ignore[attr-defined]
            assert problem(loss, 404)["code"] == "not_found"
            missing = await client.get(card, headers=bearer(admin_token), timeout=10)
            out_after_refusals.append(pool.checkedout())  # type: ignore[attr-defined]
            assert problem(missing, 404)["code"] == "not_found"
            refused = await client.get(
                "/v1/holder/usage", auth=factories.dpop(holder.access_token + "x", holder.key), timeout=10
            )
            out_after_refusals.append(pool.checkedout())  # type: ignore[attr-defined]
            assert problem(refused, 401)["code"] == "unauthorized"
        await asyncio.sleep(0.1)
        gc.collect()
    leaked = [str(warning.message) for warning in caught if "non-checked-in connection" in str(warning.message)]
    assert leaked == []
    # Each answer comes after its session closed; the service's background loops may hold one now and then.
    assert sum(out_after_refusals) < 10, out_after_refusals
    assert await pool_drained(context), f"{pool.checkedout()} connections still out"  # type: ignore[attr-defined]
    assert (await client.get(f"/v1/operator/cards/{holder.card_id}", headers=bearer(admin_token))).status_code == 200
