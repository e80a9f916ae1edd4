"""The round trip (issue 18, point 9): a real stack records the fake exchange;
`binance-recorder replay` serves a window of that recording; a second stack, whose
only Binance is the replay (its websocket and REST base URLs, nothing else changed),
records it into a second database. Every row of every stream kind received in the
window comes back equal but for when it was received (`received_at`, `received_seq`),
and the books rebuilt from the two databases are equal at every instant the second
one knows (depth snapshots are fetched by REST at other times, so they are compared
as books, not as rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tests.conftest import clean_env, cli, launch_stack, wait_until
from tests.replay_recording import Replay, rows
from worker.ops.book import book_after_update
from worker.ops.local_stack import LocalStack, free_port
from worker.store.storage import RECEIVED_COLUMNS, TABLES, make_engine
from worker.streams import KIND_TABLES, kind_family

pytestmark = pytest.mark.slow  # two stacks and a replay: about 40 s

SYMBOLS = ("BTCUSDT", "ETHUSDT")
STREAMS = (
    "trade",
    "aggTrade",
    "bookTicker",
    "depth@100ms",
    "depth5@100ms",
    "kline_1m",
    "ticker",
    "miniTicker",
    "avgPrice",
    "ticker_1h",
)
"""The spot kinds the fake sends at a steady rate, each in its own table (but klines'
open versions: the last received one of each kline stands for it, on both sides)."""
STREAM_TABLES = sorted({KIND_TABLES[kind_family(kind.partition("@")[0])] for kind in STREAMS})
WINDOW_MS = 5000
"""How much of the recording is replayed, `SPEED` times faster."""
SPEED = "10"


@dataclass(frozen=True)
class Window:
    engine: Engine  # the first stack's database, its stack stopped
    env: dict[str, str]
    start: int
    end: int


@dataclass(frozen=True)
class SecondStack:
    """A stack of its own (Redis, SQLite file, workers, beat) whose every Binance base
    URL is the replay's, on a port chosen before the replay starts: the stack starts
    while the first one records, and nothing it asks can reach anything else."""

    stack: LocalStack
    port: int


def snapshot_span(engine: Engine) -> int:
    """Milliseconds of diffs received since the last symbol's first snapshot."""
    found = rows(
        engine,
        "select max(u.received_at) - max(s.first) from depth_updates u, "
        "(select symbol, min(received_at) as first from depth_snapshots group by symbol) s",
    )
    known = rows(engine, "select count(distinct symbol) from depth_snapshots")[0][0]
    return (found[0][0] or 0) if known == len(SYMBOLS) else 0


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondStack]:
    port = free_port()
    rest, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    urls = {"BINANCE_REST_URL": rest, "BINANCE_WS_URL": ws, "BINANCE_ARCHIVE_URL": rest}
    for market in ("USDM", "COINM"):
        urls |= {f"BINANCE_{market}_REST_URL": rest, f"BINANCE_{market}_WS_URL": ws}
    # Snapshots of every level (Binance's most, more than the fake's book): the books
    # the second stack rebuilds are then whole, level for level.
    stack = LocalStack(tmp_path_factory.mktemp("second"), env=clean_env({**urls, "DEPTH_SNAPSHOT_LIMIT": "5000"}))
    try:
        stack.start_redis()
        stack.start_workers(stream_concurrency=1)
        stack.start_beat()  # not waited for here: the first stack starts meanwhile
        yield SecondStack(stack, port)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def recorded(second: SecondStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Window]:
    """The first stack's recording of the fake; the window is its last `WINDOW_MS`,
    after both books are known, up to the last row received: so it holds the last
    version of each open kline too (a kline row is its last update)."""
    stack = launch_stack(tmp_path_factory.mktemp("first"), fake_args=["--trades-per-second", "10"])
    try:
        engine = make_engine(stack.env["DATABASE_URL"])
        done = cli(stack, "subscribe", *SYMBOLS, "--streams", ",".join(STREAMS))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: snapshot_span(engine) > WINDOW_MS + 500, 60, "both books known and seconds of depth")
        env = dict(stack.env)
    finally:
        stack.stop()
    end = 1 + max(rows(engine, f"select max(received_at) from {table}")[0][0] for table in STREAM_TABLES)
    yield Window(engine, env, end - WINDOW_MS, end)


def received_rows(engine: Engine, table: str, start: int | None = None, end: int | None = None) -> list[tuple]:
    """The table's rows received from a websocket ([start, end) if given), without when
    they were received, sorted."""
    columns = TABLES[table].c
    query = select(TABLES[table]).where(columns.received_at.is_not(None))
    if start is not None and end is not None:
        query = query.where(columns.received_at >= start, columns.received_at < end)
    with engine.connect() as conn:
        found = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in conn.execute(query)]
    return sorted((row[:-RECEIVED_COLUMNS] for row in found), key=repr)


def counts(engine: Engine, start: int | None = None, end: int | None = None) -> dict[str, int]:
    return {table: len(received_rows(engine, table, start, end)) for table in STREAM_TABLES}


@pytest.fixture(scope="module")
def replayed(recorded: Window, second: SecondStack) -> Engine:
    """The second stack's recording of the replay of the window, both stopped."""
    window = ("--start", str(recorded.start), "--end", str(recorded.end))
    replay = Replay(recorded.env, *window, "--speed", SPEED, "--gaps", "continue", "--port", str(second.port))
    stack = second.stack
    try:
        stack.wait_for_workers(["worker-streams", "worker"])
        engine = make_engine(stack.env["DATABASE_URL"])
        # One call, one group, one connection: the replay's clock starts once, at its subscription.
        done = cli(stack, "subscribe", *SYMBOLS, "--streams", ",".join(STREAMS))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: replay.get("/replay/status").json()["ended"], 60, "the replay to send its window")
        expected = counts(recorded.engine, recorded.start, recorded.end)
        wait_until(lambda: counts(engine) == expected, 30, "the second stack to store every replayed row")
        assert replay.get("/replay/status").json()["clients"] == 1  # a single connection took it all
        stack.stop()
    finally:
        replay.stop()
    return engine


def test_every_row_of_every_kind_comes_back_equal_but_its_receive_time(recorded: Window, replayed: Engine) -> None:
    for table in STREAM_TABLES:
        first = received_rows(recorded.engine, table, recorded.start, recorded.end)
        assert first, f"nothing of {table} in the window: the round trip would prove nothing"
        assert received_rows(replayed, table) == first, table


def test_the_books_rebuilt_from_both_databases_are_equal(recorded: Window, replayed: Engine) -> None:
    """At the second stack's first snapshot (a book the replay served at its clock) and
    after every diff it stored since, the two databases rebuild the same book."""
    for symbol in SYMBOLS:
        snapshot = rows(replayed, "select min(last_update_id) from depth_snapshots where symbol = :s", s=symbol)[0][0]
        assert snapshot is not None, f"the second stack fetched no {symbol} snapshot from the replay"
        after = [
            row[0]
            for row in rows(
                replayed,
                "select final_update_id from depth_updates where symbol = :s and final_update_id > :u "
                "order by final_update_id",
                s=symbol,
                u=snapshot,
            )
        ]
        for update_id in [snapshot, *after]:
            assert book(replayed, symbol, update_id) == book(recorded.engine, symbol, update_id), (symbol, update_id)


def book(engine: Engine, symbol: str, update_id: int) -> dict[str, Any]:
    found = book_after_update(engine, symbol, update_id)
    return {"update_id": found.update_id, "bids": found.bids, "asks": found.asks}
