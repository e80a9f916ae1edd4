"""Random abrupt disconnects, so reconnect logic is exercised without a real outage.

Drops follow a Poisson process (exponential gaps with the configured mean) drawn
from a seeded generator: the same seed and the same connection pattern give the
same drops in every run.
"""

from __future__ import annotations

import asyncio
import random

from fake_binance.context import Context


async def drop_connections_randomly(ctx: Context) -> None:
    rng = random.Random(ctx.config.chaos_seed)
    mean = ctx.config.chaos_drop_every
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / mean))
        ids = sorted(ctx.hub.sessions)
        if ids:
            ctx.stats.dropped_by_chaos += 1
            ctx.hub.sessions[rng.choice(ids)].abort()
