"""A book whose price runs keeps its levels: the whole stack takes a fresh depth snapshot
when the top leaves the band of levels its newest snapshot holds.

The fake's price is a wave of ±2 %; at 60 trades a second its BTCUSDT moves up to about
100 ticks a second, so the top spends half of a 1,000-level snapshot's band (about 570
ticks) within some 15 s from anywhere on the wave. Snapshots are otherwise taken once an
hour (DEPTH_SNAPSHOT_INTERVAL_SECONDS) or after a break, so one taken after the book
synced, with no depth gap recorded, was taken for the band (at most one every 10 s).
Without it, `book --at` reports no level past the band (worker/ops/book.py) once the
top has run through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.conftest import launch_stack, wait_until
from tests.test_books_end_to_end import cli, fake_book, known_book, rows, states
from worker.ops.local_stack import LocalStack

pytestmark = pytest.mark.slow
LEVELS = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("band"), fake_args=["--trades-per-second", "60"])
    yield stack
    stack.stop()


def equal_to_the_fakes(stack: LocalStack) -> dict[str, Any] | None:
    """The book a second ago, when it has LEVELS levels a side equal to the fake's."""
    book = known_book(stack, "BTCUSDT", "-1s", LEVELS)
    if book is None or len(book["bids"]) < LEVELS or len(book["asks"]) < LEVELS:
        return None
    expected = fake_book(stack, "BTCUSDT", book["update_id"], LEVELS)
    return book if {"bids": book["bids"], "asks": book["asks"]} == expected else None


def test_a_running_price_gets_fresh_snapshots_and_the_book_keeps_its_levels(stack: LocalStack, db: Engine) -> None:
    done = cli(stack, "subscribe", "BTCUSDT", "--streams", "depth@100ms")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: states(stack).get("BTCUSDT") == "synced", 30, "the book synced")
    count = "select count(*) from depth_snapshots where symbol = 'BTCUSDT'"
    synced_on = rows(db, count)[0][0]  # one, or two when the first lagged the stream
    wait_until(lambda: rows(db, count)[0][0] > synced_on, 90, "a snapshot since, taken for the band")
    assert rows(db, "select count(*) from gaps where kind = 'depth'") == [(0,)]  # none was a resync
    wait_until(lambda: equal_to_the_fakes(stack), 30, f"{LEVELS} levels a side equal to the fake's")
