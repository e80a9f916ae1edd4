"""Order books in pieces: parsing Binance's documented examples, the drain's continuity
check (real redis, real SQLite file), and rebuilding books from stored rows.

The whole stack (subscribe, drops, the CLI) is in tests/test_books_end_to_end.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select
from sqlalchemy.engine import Engine

from worker.keys import RedisKeys
from worker.ops.book import BookUnknown, book_at, book_steps
from worker.ops.book_export import export_book
from worker.ops.status import problems
from worker.settings import Settings
from worker.store.books import RESYNCING, SYNCED, BookState, follow_books
from worker.store.depth import pack_levels, snapshot_row, unpack_levels
from worker.store.parsing import parse_frames
from worker.store.storage import NOT_RECEIVED, TABLE_COLUMNS, create_schema, gaps, make_engine, store_rows
from worker.streams import validate_stream_kind
from worker.times import parse_duration_ms

EXAMPLES: dict[str, Any] = json.loads((Path(__file__).parent / "fixtures" / "binance-doc-examples.json").read_text())
E = 1672515782136
AT = 1700000000000  # the clock mark of the examples' batch (each example the first frame after it: place 0)

# Documented example -> (combined stream it arrives on, table, the rows it must give).
BOOK_AND_2026_EXAMPLES = {
    "diff_depth": (
        "bnbbtc@depth@100ms",
        "depth_updates",
        [("BNBBTC", 160, 157, E, pack_levels([["0.0024", "10"]]), pack_levels([["0.0026", "100"]]), AT, 0)],
    ),
    "partial_depth": (
        "bnbbtc@depth5@100ms",
        "partial_depth",
        [("BNBBTC", 5, 160, pack_levels([["0.0024", "10"]]), pack_levels([["0.0026", "100"]]), AT, 0)],
    ),
    "ticker_window": (
        "bnbbtc@ticker_1h",
        "window_tickers",
        [
            (
                "BNBBTC",
                "1h",
                E,
                0.0015,
                250.0,
                0.001,
                0.0025,
                0.001,
                0.0025,
                0.0018,
                10000.0,
                18.0,
                0,
                1675216573749,
                0,
                18150,
                18151,
                AT,
                0,
            )
        ],
    ),  # fmt: skip
    "blockTrade": (
        "bnbbtc@blockTrade",
        "block_trades",
        [("BNBBTC", 582, 0.052, 5838.0, 1772506983321, True, 1772506983582, AT, 0)],
    ),
    "referencePrice": ("bazusd@referencePrice", "reference_prices", [("BAZUSD", 1770313263917, 1.0, AT, 0)]),
}


def combined(payload: Any, stream: str) -> bytes:
    return orjson.dumps({"stream": stream, "data": payload})


@pytest.mark.parametrize("name", BOOK_AND_2026_EXAMPLES)
def test_documented_example_gives_its_row(name: str) -> None:
    stream, table, rows = BOOK_AND_2026_EXAMPLES[name]
    batch = parse_frames([b"@%d" % AT, combined(EXAMPLES[name], stream)])
    assert batch.dead_letters == []
    assert {t: r for t, r in batch.rows.items() if r} == {table: rows}
    assert all(len(row) == len(TABLE_COLUMNS[table]) for row in rows)


def test_bare_payloads_with_an_event_type_parse_as_well() -> None:
    for name in ("diff_depth", "ticker_window", "blockTrade", "referencePrice"):
        _, table, rows = BOOK_AND_2026_EXAMPLES[name]
        batch = parse_frames([b"@%d" % AT, orjson.dumps(EXAMPLES[name])])
        assert {t: r for t, r in batch.rows.items() if r} == {table: rows}, name


def test_bare_partial_depth_is_a_dead_letter_it_names_no_symbol() -> None:
    batch = parse_frames([orjson.dumps(EXAMPLES["partial_depth"])])
    assert [d.reason for d in batch.dead_letters] == [
        "unsupported payload without event type (fields: lastUpdateId, bids, asks)"
    ]


def test_window_ticker_arrays_give_a_row_per_symbol() -> None:
    item = EXAMPLES["ticker_window"]
    batch = parse_frames([combined([item, {**item, "s": "ETHBTC"}], "!ticker_1h@arr")])
    assert [row[:2] for row in batch.rows["window_tickers"]] == [("BNBBTC", "1h"), ("ETHBTC", "1h")]


def test_reference_price_null_is_stored_as_null() -> None:
    batch = parse_frames([combined({**EXAMPLES["referencePrice"], "r": None}, "bazusd@referencePrice")])
    assert batch.rows["reference_prices"] == [("BAZUSD", 1770313263917, None, None, 0)]  # no mark: first in the batch


def test_bad_levels_are_a_dead_letter_naming_the_field() -> None:
    payload = {**EXAMPLES["diff_depth"], "b": [["0.0024"]]}
    [dead] = parse_frames([combined(payload, "bnbbtc@depth")]).dead_letters
    assert dead.reason.startswith("depth frame has field 'b': levels [['0.0024']] are not [price, quantity]")


def test_levels_round_trip_exactly() -> None:
    levels = [["30000.01000000", "0.12345678"], ["29999.99", "0"], ["0.00000001", "123456789.12345678"]]
    assert unpack_levels(pack_levels(levels)) == [(float(p), float(q)) for p, q in levels]
    assert len(pack_levels(levels)) == 16 * len(levels)


@pytest.mark.parametrize(
    ("asked", "canonical"),
    [("depth@100ms", "depth@100ms"), ("DEPTH20@100ms", "depth20@100ms"), ("blocktrade", "blockTrade"),
     ("!miniTicker@arr", "!miniTicker@arr"), ("ticker_4h", "ticker_4h")],
)  # fmt: skip
def test_new_kinds_validate(asked: str, canonical: str) -> None:
    assert validate_stream_kind(asked) == canonical


def test_durations() -> None:
    assert [parse_duration_ms(t) for t in ("100ms", "1s", "2m", "1h")] == [100, 1000, 120_000, 3_600_000]
    with pytest.raises(ValueError, match="cannot read the duration '0s'"):
        parse_duration_ms("0s")


# -- continuity in the drain, and rebuilding ---------------------------------------------

SYMBOL = "BTCUSDT"
T0 = 1_800_000_000_000


def event(first: int, final: int, bids: list[list[str]] | None = None, asks: list[list[str]] | None = None) -> tuple:
    """A depth_updates row; its event time is T0 + 100 ms per final id."""
    return (SYMBOL, final, first, T0 + 100 * final, pack_levels(bids or []), pack_levels(asks or []), *NOT_RECEIVED)


def snapshot(update_id: int, bids: list[list[str]], asks: list[list[str]]) -> tuple:
    return snapshot_row(SYMBOL, {"lastUpdateId": update_id, "bids": bids, "asks": asks}, T0)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'books.db'}")
    create_schema(engine)
    return engine


def drain(engine: Engine, client: redis.Redis, keys: RedisKeys, rows: list[tuple]) -> dict[str, str]:
    with engine.begin() as conn:
        store_rows(conn, {"depth_updates": rows})
        followed = follow_books(conn, client, keys, rows, T0)
    followed.save(client, keys)
    return followed.states


def store_snapshot(engine: Engine, row: tuple) -> None:
    with engine.begin() as conn:
        store_rows(conn, {"depth_snapshots": [row]})


def needing(client: redis.Redis, keys: RedisKeys) -> set[bytes]:
    return client.smembers(keys.books_needing_snapshot())


def test_a_book_syncs_on_a_straddling_snapshot_and_a_break_records_a_gap_until_the_resync(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    assert drain(engine, redis_client, keys, [event(1, 3), event(4, 6)]) == {SYMBOL: RESYNCING}
    assert needing(redis_client, keys) == {SYMBOL.encode()}
    redis_client.delete(keys.books_needing_snapshot())  # as tasks.snapshot_books does
    store_snapshot(engine, snapshot(5, [["10", "1"]], [["11", "1"]]))  # between U=4 and u=6
    assert drain(engine, redis_client, keys, [event(7, 8)]) == {SYMBOL: SYNCED}
    assert drain(engine, redis_client, keys, [event(7, 8), event(9, 9)]) == {SYMBOL: SYNCED}  # an overlap
    assert drain(engine, redis_client, keys, [event(12, 13)]) == {SYMBOL: RESYNCING}  # 10 and 11 lost
    with engine.connect() as conn:
        recorded = conn.execute(select(gaps.c.kind, gaps.c.first_missing, gaps.c.last_missing)).all()
    assert recorded == [("depth", T0 + 900, T0 + 1300)]
    store_snapshot(engine, snapshot(8, [["10", "1"]], [["11", "1"]]))  # older than the break
    assert drain(engine, redis_client, keys, [event(14, 15)]) == {SYMBOL: RESYNCING}
    assert needing(redis_client, keys) == {SYMBOL.encode()}  # a newer one is needed
    store_snapshot(engine, snapshot(14, [["10", "2"]], [["11", "1"]]))
    assert drain(engine, redis_client, keys, [event(16, 16)]) == {SYMBOL: SYNCED}
    with engine.connect() as conn:
        assert conn.execute(select(gaps.c.last_missing)).scalar_one() == T0 + 1500  # first event on it
    state = BookState.load(redis_client, keys, SYMBOL)
    # The rate starts at 1 event in the 200 ms after the first round (5/s), then follows
    # each round with a 10 s time constant: 10/s over 100 ms, 2.5/s over 400 ms, 5/s,
    # 10/s move it by 1%, 4%, 2% and 1% of the difference: 4.9995, stored as 5.00.
    assert (state.last_update_id, state.gap_since, state.updates_per_second) == (16, None, 5.0)


def test_a_synced_books_newest_diffs_say_where_its_top_is(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    store_snapshot(engine, snapshot(2, [["10", "1"]], [["11", "1"]]))
    first = event(1, 3, bids=[["10.5", "2"], ["10.8", "0"]], asks=[["11.5", "0"], ["10.9", "3"], ["12", "1"]])
    assert drain(engine, redis_client, keys, [first, event(4, 5, bids=[["10.2", "1"]])]) == {SYMBOL: SYNCED}
    state = BookState.load(redis_client, keys, SYMBOL)
    assert (state.bid_seen, state.ask_seen) == (10.2, 10.9)  # each side from the newest diff that has one
    drain(engine, redis_client, keys, [event(6, 6, bids=[["10.7", "0"], ["10.6", "4"]])])
    state = BookState.load(redis_client, keys, SYMBOL)
    assert (state.bid_seen, state.ask_seen) == (10.6, 10.9)


def test_a_batch_whose_transaction_fails_shows_its_break_again_when_retried(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    store_snapshot(engine, snapshot(2, [["10", "1"]], [["11", "1"]]))
    assert drain(engine, redis_client, keys, [event(1, 3), event(4, 5)]) == {SYMBOL: SYNCED}
    with pytest.raises(RuntimeError), engine.begin() as conn:
        store_rows(conn, {"depth_updates": [event(8, 9)]})
        follow_books(conn, redis_client, keys, [event(8, 9)], T0)  # 6 and 7 lost
        raise RuntimeError("the commit fails")
    assert BookState.load(redis_client, keys, SYMBOL).last_update_id == 5  # nothing saved
    assert drain(engine, redis_client, keys, [event(8, 9)]) == {SYMBOL: RESYNCING}  # the retry
    with engine.connect() as conn:
        assert conn.execute(select(gaps.c.first_missing, gaps.c.last_missing)).all() == [(T0 + 500, T0 + 900)]


def test_a_batch_of_many_books_being_resynced_looks_their_snapshots_up_at_once(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    """Until every book has a snapshot (1,500 take many minutes of REST weight) nearly
    every event is of a book being resynced: one query for the batch's books, plus one
    per book that a snapshot may sync, not one per book."""
    symbols = [f"S{number}USDT" for number in range(50)]
    straddled, stale = symbols[0], symbols[1]
    with engine.begin() as conn:
        store_rows(
            conn, {"depth_snapshots": [snapshot_row(straddled, {"lastUpdateId": 5, "bids": [], "asks": []}, T0)]}
        )
        store_rows(conn, {"depth_snapshots": [snapshot_row(stale, {"lastUpdateId": 2, "bids": [], "asks": []}, T0)]})
    rows = [(symbol, *event(4, 6)[1:]) for symbol in symbols]
    statements: list[str] = []

    def record(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        statements.append(sql)

    sqlalchemy_event.listen(engine, "before_cursor_execute", record)
    states = drain(engine, redis_client, keys, rows)
    sqlalchemy_event.remove(engine, "before_cursor_execute", record)
    assert states == {symbol: SYNCED if symbol == straddled else RESYNCING for symbol in symbols}
    assert needing(redis_client, keys) == {symbol.encode() for symbol in symbols[1:]}
    assert sum("FROM depth_snapshots" in sql for sql in statements) == 2


def fill(engine: Engine) -> None:
    """Snapshot 5, then events 4-6 (straddles), 7-8, 9-9; 10-11 lost; 12-13; snapshot 13; 14-15, 16-17."""
    store_snapshot(engine, snapshot(5, [["10", "1"], ["9", "2"], ["8", "3"]], [["11", "1"], ["12", "2"]]))
    rows = [
        event(1, 3, [["10", "5"]]),  # before the snapshot: skipped
        event(4, 6, [["10", "0"], ["9.5", "4"]]),
        event(7, 8, [], [["11", "0"], ["11.5", "7"]]),
        event(9, 9, [["9", "2.5"]]),
        event(12, 13, [["9", "9"]]),
        event(14, 15, [["7", "1"]], [["13", "1"]]),
        event(16, 17, [], [["13", "0"]]),
    ]
    with engine.begin() as conn:
        store_rows(conn, {"depth_updates": rows})
    store_snapshot(engine, snapshot(13, [["9.5", "4"], ["9", "1"]], [["11.5", "7"]]))


def test_book_at_replays_from_the_snapshot(engine: Engine) -> None:
    fill(engine)
    book = book_at(engine, SYMBOL, T0 + 850)  # after update 8
    assert book.as_json() == {
        "symbol": SYMBOL, "update_id": 8, "time": T0 + 800,
        "bids": [[9.5, 4.0], [9.0, 2.0], [8.0, 3.0]], "asks": [[11.5, 7.0], [12.0, 2.0]],
    }  # fmt: skip
    assert book_at(engine, SYMBOL, T0 + 850, levels=1).bids == [(9.5, 4.0)]
    on_snapshot = book_at(engine, SYMBOL, T0 + 1350)  # update 13 is the second snapshot itself
    assert (on_snapshot.update_id, on_snapshot.time, on_snapshot.bids) == (13, T0 + 1300, [(9.5, 4.0), (9.0, 1.0)])
    after = book_at(engine, SYMBOL, T0 + 1500)  # on the second snapshot
    # Bid 7 and ask 13 are known, but beyond the second snapshot's range, so not reported.
    assert (after.update_id, after.bids, after.asks) == (
        15,
        [(9.5, 4.0), (9.0, 1.0)],
        [(11.5, 7.0)],
    )


def test_book_at_says_where_the_nearest_books_are(engine: Engine) -> None:
    fill(engine)
    with pytest.raises(
        BookUnknown,
        match=r"before the first snapshot of BTCUSDT: the first known book is at .*\(update id 6, on the snapshot at 5",
    ):
        book_at(engine, SYMBOL, T0 + 300)
    with pytest.raises(BookUnknown) as inside:
        book_at(engine, SYMBOL, T0 + 950)  # after update 9, but 10 may have come before
    assert "inside a gap of BTCUSDT's book: updates from id 10 are missing" in str(inside.value)
    assert "known up to 2027-01-15T08:00:00.900Z (update id 9)" in str(inside.value)
    assert "known again from 2027-01-15T08:00:01.500Z (update id 15, on the snapshot at 13)" in str(inside.value)
    with pytest.raises(BookUnknown, match="updates from id 10 are missing"):
        book_at(engine, SYMBOL, T0 + 1250)
    with pytest.raises(BookUnknown, match="no order book of ETHUSDT is recorded"):
        book_at(engine, "ETHUSDT", T0)


def test_book_steps_skip_unknown_instants_and_export_streams_them(engine: Engine, tmp_path: Path) -> None:
    fill(engine)
    steps = list(book_steps(engine, SYMBOL, T0, T0 + 2000, 200, 2))
    # 1000 and 1200 are inside the gap; after 1700 nothing is drained yet.
    assert [(at - T0, update_id) for at, update_id, _, _ in steps] == [(600, 6), (800, 8), (1400, 13), (1600, 15)]
    assert steps[0][2:] == ([(9.5, 4.0), (9.0, 2.0)], [(11.0, 1.0), (12.0, 2.0)])
    path = tmp_path / "book.csv"
    assert export_book(engine, SYMBOL, T0, T0 + 2000, 200, 3, path) == 4
    lines = path.read_text().splitlines()
    assert lines[0].startswith("time,update_id,bid_price_1,bid_qty_1,bid_price_2")
    assert lines[1] == f"{T0 + 600},6,9.5,4.0,9.0,2.0,8.0,3.0,11.0,1.0,12.0,2.0,,"
    parquet = tmp_path / "book.parquet"
    assert export_book(engine, SYMBOL, T0, T0 + 2000, 200, 3, parquet, fmt="parquet") == 4
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    assert table.column("ask_price_3").to_pylist() == [None] * 4


def test_a_book_unknown_for_over_a_minute_is_a_problem() -> None:
    book = {"symbol": SYMBOL, "market": "spot", "state": RESYNCING, "gap_since": T0}
    book.update(last_update_id=9, last_event_time=T0)
    snapshot: dict[str, Any] = {
        "generated_at": T0 + 61_000,
        "groups": [],
        "books": [book],
        "storage_error": None,
        "redis_memory": {"used": 1, "max": 0},
        "backlog": 0,
    }
    assert problems(snapshot, Settings()) == [
        "order book of BTCUSDT unknown for 61s: "
        "is beat running tasks.snapshot_books, and can it reach BINANCE_REST_URL?"
    ]
    assert problems({**snapshot, "generated_at": T0 + 30_000}, Settings()) == []
    assert problems({**snapshot, "books": [{**book, "state": SYNCED, "gap_since": None}]}, Settings()) == []
    assert problems({**snapshot, "books": [{**book, "market": "usdm"}]}, Settings()) == [
        "usdm order book of BTCUSDT unknown for 61s: "
        "is beat running tasks.snapshot_books, and can it reach BINANCE_USDM_REST_URL?"
    ]
    # A reconnect of a big group breaks many books at once: one line, not one a book.
    many = [{**book, "symbol": f"SYM{n:04d}USDT", "gap_since": T0 + n} for n in range(412)]
    assert problems({**snapshot, "books": many}, Settings()) == [
        "412 order books unknown for over 60s, SYM0000USDT's for 61s (`status --json` lists them, the books line "
        "says when the weight budget reaches them): is beat running tasks.snapshot_books, and can it reach "
        "BINANCE_REST_URL?"
    ]


# -- REST snapshots (tasks.snapshot_books' work) against the fake ----------------------------


def test_snapshots_are_fetched_when_needed_or_due_and_spend_the_shared_weight(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    from tests.test_fake_exchange import running_fake
    from worker.exchange.rest import BinanceRest
    from worker.exchange.snapshots import TopBand, take_snapshots
    from worker.groups import Group, GroupRegistry
    from worker.store.storage import depth_snapshots

    redis_client.sadd(keys.books_needing_snapshot(), "XRPUSDT")  # no longer recorded
    no_database = lambda: pytest.fail("the database was opened without a book to snapshot")  # noqa: E731
    GroupRegistry(redis_client, keys).want(Group("g0", ("ethusdt@trade",)))
    with running_fake() as fake:
        settings = Settings(
            redis_prefix=keys.prefix, binance_rest_url=f"http://127.0.0.1:{fake.port}", depth_snapshot_limit=1000
        )
        rest = BinanceRest.from_settings(settings, redis_client)
        nothing = {"stored": [], "failed": {}, "waiting": 0}
        assert take_snapshots(settings, redis_client, no_database, rest) == nothing
        GroupRegistry(redis_client, keys).want(Group("g1", ("btcusdt@depth@100ms", "ethusdt@trade")))
        redis_client.sadd(keys.books_needing_snapshot(), "XRPUSDT", "BTCUSDT")  # the drain saw BTCUSDT's events
        stored = {"stored": ["BTCUSDT"], "failed": {}, "waiting": 0}
        assert take_snapshots(settings, redis_client, lambda: engine, rest) == stored
        assert sum(int(redis_client.get(key)) for key in redis_client.keys(f"{keys.prefix}:rest:weight:*")) == 50
        assert needing(redis_client, keys) == set()
        synced = BookState(SYNCED, 1, T0, updates_per_second=10.0).as_fields()
        redis_client.hset(keys.book("BTCUSDT"), mapping=synced)  # as the drain does
        redis_client.sadd(keys.books(), "BTCUSDT")
        assert take_snapshots(settings, redis_client, lambda: engine, rest)["stored"] == []  # not due for an hour
        band = TopBand.parse(redis_client.hget(keys.book_bands(), "BTCUSDT"))  # half the snapshot's levels each way
        with engine.connect() as conn:
            bids, asks = (
                unpack_levels(side)
                for side in conn.execute(select(depth_snapshots.c.bids, depth_snapshots.c.asks)).one()
            )
        # The fake's grid ends 500 levels past the wave's extremes: near one, a side has fewer
        # levels than asked, which is the whole side (no edge); the other side is full.
        assert band.above == ((asks[0][0] + asks[-1][0]) / 2 if len(asks) == 1000 else math.inf)
        assert band.below == ((bids[0][0] + bids[-1][0]) / 2 if len(bids) == 1000 else -math.inf)
        inside = {"bid_seen": repr(bids[0][0]), "ask_seen": repr(asks[0][0])}
        redis_client.hset(keys.book("BTCUSDT"), mapping=inside)
        assert take_snapshots(settings, redis_client, lambda: engine, rest)["stored"] == []  # inside its band
        with engine.begin() as conn:  # a band refresh waits BAND_MIN_AGE_MS after a snapshot
            conn.execute(depth_snapshots.update().values(received_at=depth_snapshots.c.received_at - 60_000))
        # The top ran half through the snapshot's asks (or bids):
        ran = {"bid_seen": repr(band.above)} if len(asks) == 1000 else {"ask_seen": repr(band.below)}
        redis_client.hset(keys.book("BTCUSDT"), mapping=ran)
        assert take_snapshots(settings, redis_client, lambda: engine, rest)["stored"] == ["BTCUSDT"]
        refresh = dataclasses.replace(settings, depth_snapshot_interval_seconds=0.001)
        assert take_snapshots(refresh, redis_client, lambda: engine, rest)["stored"] == ["BTCUSDT"]  # due
        redis_client.hset(keys.book("BTCUSDT"), "state", RESYNCING)  # the drain found a break
        redis_client.sadd(keys.books_needing_snapshot(), "BTCUSDT")
        assert take_snapshots(settings, redis_client, lambda: engine, rest)["stored"] == ["BTCUSDT"]
        with engine.connect() as conn:
            update_id, bids = conn.execute(
                select(depth_snapshots.c.last_update_id, depth_snapshots.c.bids).order_by(
                    depth_snapshots.c.last_update_id.desc()
                )
            ).first()  # type: ignore[misc]
        book = fake.get(f"/fake/book?symbol=BTCUSDT&update_id={update_id}")[2]
        assert unpack_levels(bids) == [(float(p), float(q)) for p, q in book["bids"][:1000]]


def test_book_states_are_those_of_books_recorded_now(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    from worker.groups import Group, GroupRegistry
    from worker.store.books import book_states

    drain(engine, redis_client, keys, [event(1, 3)])
    registry = GroupRegistry(redis_client, keys)
    registry.want(Group("g1", ("btcusdt@depth", "btcusdt@trade")))
    assert {symbol: book.last_update_id for symbol, book in book_states(redis_client, keys).items()} == {SYMBOL: 3}
    registry.unwant("g1")
    assert book_states(redis_client, keys) == {}


def test_overlapping_events_of_both_speeds_rebuild_the_same_book(engine: Engine) -> None:
    """depth and depth@100ms of one symbol: the one-second event overlaps the 100 ms ones,
    with the quantities as of its last id, so applying by final id stays exact."""
    store_snapshot(engine, snapshot(0, [["10", "1"], ["9", "3"], ["8", "1"]], [["11", "1"]]))
    fast = [event(1, 2, [["10", "2"]]), event(3, 4, [["9", "1"]]), event(5, 6, [["10", "0"]])]
    slow = [event(1, 5, [["10", "2"], ["9", "1"]])]  # a one-second event cut elsewhere
    with engine.begin() as conn:
        store_rows(conn, {"depth_updates": fast + slow})
    at = book_at(engine, SYMBOL, T0 + 650)
    assert (at.update_id, at.bids, at.asks) == (6, [(9.0, 1.0), (8.0, 1.0)], [(11.0, 1.0)])


def test_levels_beyond_the_snapshots_range_are_not_reported(engine: Engine) -> None:
    """Below the snapshot's lowest bid only changed levels are known, not the ones between."""
    store_snapshot(engine, snapshot(0, [["10", "1"], ["9", "1"]], [["11", "1"], ["12", "1"]]))
    rows = [event(1, 1, [["10", "0"], ["8", "5"]], [["13", "2"], ["11.5", "3"]])]
    with engine.begin() as conn:
        store_rows(conn, {"depth_updates": rows})
    book = book_at(engine, SYMBOL, T0 + 100)
    assert (book.bids, book.asks) == ([(9.0, 1.0)], [(11.0, 1.0), (11.5, 3.0), (12.0, 1.0)])
