"""150 order books through the real stack (redis, celery worker and beat, the fake
exchange in its market-load mode, whose books are Zipf-skewed by rank), with a weight
budget far below what their first snapshots cost: the busiest books are synced first
and deepest, the others with 100-level snapshots, the fake never answers 429 or 418,
and `status` says how many are synced and, right, when the rest will be."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from fake_binance.listing import market_symbols
from tests.conftest import fake_stats, launch_stack, status_command, wait_until
from tests.test_books_end_to_end import fake_book, known_book
from tests.test_metrics import collect
from worker.exchange.ratelimit import MINUTE_MS
from worker.keys import RedisKeys
from worker.ops.local_stack import LocalStack
from worker.settings import Settings
from worker.store.depth import unpack_levels
from worker.store.storage import make_engine

BOOKS = 150
SYMBOLS = market_symbols(BOOKS)  # by rank: the busiest first
BUDGET = 700
DEEP = 10
# 10 x 50 + 140 x 5 = 1,200 weight (and 20 for the subscription's exchangeInfo): at least
# two minutes of a 700 budget, the second one holding all that the first left.


pytestmark = pytest.mark.slow  # a minute: the budget is counted per UTC minute


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # The fake allows a deep snapshot more than the recorder's budget: both count per UTC
    # minute, and a request sent at the end of one may be counted at the start of the next.
    fake_args = ["--market-load-rate", "3000", "--market-load-symbols", str(BOOKS), "--weight-limit", str(BUDGET + 50)]
    env = {"REST_WEIGHT_BUDGET_PER_MINUTE": str(BUDGET), "DEPTH_SNAPSHOT_DEEP_BOOKS": str(DEEP)}
    stack = launch_stack(tmp_path_factory.mktemp("market-books"), fake_args=fake_args, env=env)
    yield stack
    stack.stop()


def first_snapshots(db: Engine) -> dict[str, tuple[int, int]]:
    """Symbol -> (received_at, bid levels) of its first stored snapshot."""
    with db.connect() as conn:
        rows = conn.execute(text("select symbol, received_at, bids from depth_snapshots order by received_at"))
        first: dict[str, tuple[int, int]] = {}
        for symbol, received_at, bids in rows:
            first.setdefault(symbol, (received_at, len(unpack_levels(bids))))
    return first


def weight_used(client: redis.Redis, minute: int) -> int:
    return int(client.get(RedisKeys("recorder").rest_weight(minute, "")) or 0)


def test_many_books_sync_busiest_first_within_the_budget_and_status_says_when(stack: LocalStack) -> None:
    db = make_engine(stack.env["DATABASE_URL"])
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    # Subscribed with 15 s or more left in the minute: every book has its first events and
    # its rate (the quietest send a diff every 3 to 5 s, then wait 5 s for a rate) while this
    # minute lasts, so this minute's budget runs out, and before its end.
    wait_until(lambda: time.time() % 60 < 45, 20, "a minute with 15 s left", interval=0.1)
    subscribed_in = int(time.time() * 1000) // MINUTE_MS
    done = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "subscribe", *SYMBOLS, "--streams", "depth@100ms"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    # The first minute whose budget the snapshots spend: the subscription's own minute when
    # every book has its rate in time, the next one on a machine too busy for that. Its
    # status is read within that minute (read again when the minute ended meanwhile).
    minute, status, text_status, remaining = wait_until(
        lambda: spent_minute_status(stack, client, db), 150, "a minute's budget spent"
    )
    assert minute in (subscribed_in, subscribed_in + 1)
    (outlook,) = status["book_sync"]
    assert (outlook["market"], outlook["books"], outlook["budget_per_minute"]) == ("spot", BOOKS, BUDGET)
    assert outlook["synced"] < BOOKS and 0 < outlook["waiting_weight"] <= BUDGET  # what the next minute holds
    assert outlook["rest_by"] == (minute + 1) * MINUTE_MS
    assert 0 < remaining["spot"] * 1000 <= outlook["rest_by"] - minute * MINUTE_MS  # /metrics has the estimate too
    line = re.search(r"^books: (\d+) of 150 synced, the rest by ~(\d\d:\d\d) \(budget 700/min\)$", text_status, re.M)
    assert line is not None and line[2] == time.strftime("%H:%M", time.gmtime((minute + 1) * 60))

    all_synced = lambda: json.loads(status_command(stack, "--json").stdout)["book_sync"][0]["synced"] == BOOKS  # noqa: E731
    # Synced within half a minute of the estimate (which is to the minute): the last snapshots
    # come at the minute's start, a quiet book syncs at its next event (3 to 5 s) and the drain
    # and `status` take a few seconds on a busy machine.
    wait_until(all_synced, outlook["rest_by"] / 1000 + 30 - time.time(), "every book synced by the estimate + 30 s")
    assert "books: 150 of 150 synced (budget 700/min)" in status_text(stack)

    first = first_snapshots(db)
    assert set(first) == set(SYMBOLS)
    rank = {symbol: number for number, symbol in enumerate(SYMBOLS)}
    # Liquid first: the 20 busiest (2.2 to 10 diffs a second) had theirs by the end of the
    # first spent minute; the books left to later minutes are all quieter ones.
    spent_by = (minute + 1) * MINUTE_MS
    assert all(first[symbol][0] < spent_by for symbol in SYMBOLS[:20])
    assert all(rank[symbol] >= 20 for symbol, (at, _levels) in first.items() if at >= spent_by)
    # Deep snapshots for the busiest only (the top ranks, by measured rate), 100 levels for the rest.
    deep = {symbol for symbol, (_at, levels) in first.items() if levels > 100}
    assert set(SYMBOLS[:3]) <= deep and all(rank[symbol] < 30 for symbol in deep)
    assert {levels for symbol, (_at, levels) in first.items() if symbol not in deep} == {100}
    # A book on a 100-level snapshot is shallower, never wrong: the rebuilt levels are the
    # fake's own best levels at that update id, as many as the snapshot's price range holds.
    depths = {}
    for symbol in (SYMBOLS[0], SYMBOLS[-1]):
        book = wait_until(lambda s=symbol: known_book(stack, s, "-1s", levels=0), 20, f"{symbol}'s book known")
        expected = fake_book(stack, symbol, book["update_id"], max(len(book["bids"]), len(book["asks"])))
        assert book["bids"] == expected["bids"][: len(book["bids"])]
        assert book["asks"] == expected["asks"][: len(book["asks"])]
        depths[symbol] = len(book["bids"]) + len(book["asks"])
    # Within its snapshot's price range: levels that appear inside it later count too, and a
    # price that ran past it leaves that side with fewer (none at worst, never invented ones).
    assert 0 < depths[SYMBOLS[-1]] < depths[SYMBOLS[0]] / 2
    # The fake counted every request's weight against a limit just above the budget.
    answers = fake_stats(stack)["rest"]["by_status"]
    assert set(answers) == {"200"} and answers["200"] > BOOKS


def spent_minute_status(
    stack: LocalStack, client: redis.Redis, db: Engine
) -> tuple[int, dict[str, Any], str, dict[str, float]] | None:
    """Once the current minute's budget is spent: the minute, and `status --json`, `status`
    and /metrics' estimates, all read within it."""
    minute = int(time.time() * 1000) // MINUTE_MS
    if weight_used(client, minute) <= BUDGET - 5:
        return None
    status = json.loads(status_command(stack, "--json").stdout)
    text_status = status_text(stack)
    metric = "binance_recorder_books_sync_remaining_seconds"
    remaining = collect(Settings.from_env(stack.env), client, db).by(metric, "market")
    return (minute, status, text_status, remaining) if int(time.time() * 1000) // MINUTE_MS == minute else None


def status_text(stack: LocalStack) -> str:
    return status_command(stack).stdout
