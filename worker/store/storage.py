"""The SQL schema and the batch inserts of the drain (SQLAlchemy Core, no ORM).

Every table is keyed by Binance's natural key, so storing a row twice stores it once:
the drain can retry a batch after a crash without creating duplicates. Rows arrive
as plain tuples in `TABLE_COLUMNS` order (the parser builds them that way) because
building a SQLAlchemy object or a dict per row would cost more than the insert itself.

This module knows tables and SQL, nothing about Binance's payloads.

The tables keep SQLite's rowid (they are not WITHOUT ROWID). Measured with 100k rows
in 5000-row transactions (WAL): WITHOUT ROWID inserts are 1.1-1.2x as fast while a batch
holds 1 to 20 symbols, but only 0.4-0.7x as fast when it interleaves 400 symbols, and
0.6-0.8x even with a 64 MB page cache: a WITHOUT ROWID table is one B-tree ordered by
the key, so interleaved symbols land on as many different leaf pages, which every
commit rewrites; a rowid table appends its rows and scatters only the small key index
entries. Recording many symbols at once is this service's purpose, so rowid it is.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    exc,
    false,
    inspect,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.schema import CreateView

from worker import times
from worker.streams import FUTURES_MARKETS

metadata = MetaData()


def _symbol() -> Column[Any]:
    return Column("symbol", String(32), primary_key=True)


def _key(name: str) -> Column[Any]:
    return Column(name, BigInteger, primary_key=True)


def _reals(*names: str, nullable: bool = False, key: bool = False) -> list[Column[Any]]:
    """Prices and quantities: Binance's decimal strings fit a float64 exactly."""
    return [Column(name, Float, nullable=nullable, primary_key=key) for name in names]


def _texts(*names: str, key: bool = False, nullable: bool = False) -> list[Column[Any]]:
    """Binance's names and enumerations (pairs, contract types, order sides and states)."""
    return [Column(name, String(32), primary_key=key, nullable=nullable) for name in names]


def _ints(*names: str, nullable: bool = False) -> list[Column[Any]]:
    """Ids, counts and times (milliseconds since the epoch, as Binance sends them)."""
    return [Column(name, BigInteger, nullable=nullable) for name in names]


def _flag(name: str) -> Column[Any]:
    return Column(name, Boolean, nullable=False)


def _levels(*names: str) -> list[Column[Any]]:
    """Price levels of one book side, packed float64 pairs (see worker/store/depth.py)."""
    return [Column(name, LargeBinary, nullable=False) for name in names]


def _received() -> list[Column[Any]]:
    """When and in what order the recorder received the row's websocket frame, last in
    every table. `received_at`: the ms of the clock mark of its flush, for
    Binance->recorder latency and the order of events across symbols. `received_seq`:
    the frame's place in that flush (0 for the first frame after the mark), the order
    of frames that share a `received_at` (see `worker.buffer`); the rows of one frame
    (an all-market array) share it. Both NULL for rows from REST (backfill, snapshots'
    `received_seq`); `received_seq` NULL also for rows stored before it existed."""
    return [Column("received_at", BigInteger, nullable=True), Column("received_seq", Integer, nullable=True)]


RECEIVED_COLUMNS = 2
"""How many columns `_received` puts at the end of every table (and every row tuple)."""

NOT_RECEIVED = (None,) * RECEIVED_COLUMNS
"""The end of a row that came from REST, not from a websocket frame."""


# One column definition per kind, without `received_at` (last in every table): spot's
# tables are built from them below, each futures market's from the same definitions
# with its prefix and the fields Binance's futures payloads add (`_FUTURES_TABLES`).


def _trade_columns() -> list[Column[Any]]:
    return [
        _symbol(),
        _key("trade_id"),
        *_reals("price", "qty"),
        *_ints("trade_time"),
        _flag("buyer_is_maker"),
        *_ints("event_time", nullable=True),  # REST backfill has no event time
    ]


def _agg_trade_columns() -> list[Column[Any]]:
    return [
        _symbol(),
        _key("agg_id"),
        *_reals("price", "qty"),
        *_ints("first_trade_id", "last_trade_id", "trade_time"),
        _flag("buyer_is_maker"),
        *_ints("event_time", nullable=True),
    ]


def _candle_columns() -> list[Column[Any]]:
    """What every kind of kline has, after its key: an open kline is replaced until it
    closes (`is_closed`; see `store_rows`)."""
    return [*_ints("close_time"), *_reals("open", "high", "low", "close")]


def _kline_volume_columns() -> list[Column[Any]]:
    return [
        *_reals("volume", "quote_volume"),
        *_ints("trade_count"),
        *_reals("taker_buy_base_volume", "taker_buy_quote_volume"),
    ]


def _interval() -> Column[Any]:
    return Column("interval", String(3), primary_key=True)


def _kline_columns() -> list[Column[Any]]:
    return [
        _symbol(),
        _interval(),
        _key("open_time"),
        *_candle_columns(),
        *_kline_volume_columns(),
        *_ints("first_trade_id", "last_trade_id", nullable=True),  # absent from REST klines
        _flag("is_closed"),
        *_ints("event_time", nullable=True),
    ]


_SPOT_ONLY_TICKER_FIELDS = ("prev_close_price", "bid_price", "bid_qty", "ask_price", "ask_qty")
"""Fields of spot's 24 h ticker that Binance's futures tickers do not carry."""


def _ticker_columns(spot: bool = True) -> list[Column[Any]]:
    reals = (
        "price_change",
        "price_change_percent",
        "weighted_avg_price",
        "prev_close_price",
        "last_price",
        "last_qty",
        "bid_price",
        "bid_qty",
        "ask_price",
        "ask_qty",
        "open_price",
        "high_price",
        "low_price",
        "base_volume",
        "quote_volume",
    )
    return [
        _symbol(),
        _key("event_time"),
        *_reals(*(name for name in reals if spot or name not in _SPOT_ONLY_TICKER_FIELDS)),
        *_ints("open_time", "close_time", "first_trade_id", "last_trade_id", "trade_count"),
    ]


def _mini_ticker_columns() -> list[Column[Any]]:
    return [
        _symbol(),
        _key("event_time"),
        *_reals("close_price", "open_price", "high_price", "low_price", "base_volume", "quote_volume"),
    ]


def _book_ticker_columns() -> list[Column[Any]]:
    # Spot's bookTicker carries no time of its own: received_at is its time column.
    return [_symbol(), _key("update_id"), *_reals("bid_price", "bid_qty", "ask_price", "ask_qty")]


# Order books. A diff event covers the update ids first_update_id..final_update_id, and
# final_update_id is its natural key; its levels carry absolute quantities (0 removes).
def _depth_update_columns() -> list[Column[Any]]:
    return [_symbol(), _key("final_update_id"), *_ints("first_update_id", "event_time"), *_levels("bids", "asks")]


# `GET /api/v3/depth` answers: the book at update id last_update_id, best levels first.
def _depth_snapshot_columns() -> list[Column[Any]]:
    return [_symbol(), _key("last_update_id"), *_levels("bids", "asks")]


# Top-N books of `<s>@depth<N>`. depth5 and depth20 of one symbol carry the same
# lastUpdateId, so the number of levels is part of the key.
def _partial_depth_columns() -> list[Column[Any]]:
    return [_symbol(), Column("levels", Integer, primary_key=True), _key("last_update_id"), *_levels("bids", "asks")]


trades = Table("trades", metadata, *_trade_columns(), *_received())
agg_trades = Table("agg_trades", metadata, *_agg_trade_columns(), *_received())
klines = Table("klines", metadata, *_kline_columns(), *_received())
tickers = Table("tickers", metadata, *_ticker_columns(), *_received())
mini_tickers = Table("mini_tickers", metadata, *_mini_ticker_columns(), *_received())
book_tickers = Table("book_tickers", metadata, *_book_ticker_columns(), *_received())

avg_prices = Table(
    "avg_prices",
    metadata,
    _symbol(),
    _key("event_time"),
    Column("interval", String(3), nullable=False),
    *_reals("avg_price"),
    *_ints("last_trade_time"),
    *_received(),
)

depth_updates = Table("depth_updates", metadata, *_depth_update_columns(), *_received())
depth_snapshots = Table("depth_snapshots", metadata, *_depth_snapshot_columns(), *_received())
partial_depth = Table("partial_depth", metadata, *_partial_depth_columns(), *_received())

# Rolling-window tickers `<s>@ticker_<1h|4h|1d>` and `!ticker_<w>@arr`.
window_tickers = Table(
    "window_tickers",
    metadata,
    _symbol(),
    Column("window", String(3), primary_key=True),
    _key("event_time"),
    *_reals(
        "price_change",
        "price_change_percent",
        "open_price",
        "high_price",
        "low_price",
        "last_price",
        "weighted_avg_price",
        "base_volume",
        "quote_volume",
    ),
    *_ints("open_time", "close_time", "first_trade_id", "last_trade_id", "trade_count"),
    *_received(),
)

block_trades = Table(
    "block_trades",
    metadata,
    _symbol(),
    _key("block_trade_id"),
    *_reals("price", "qty"),
    *_ints("trade_time"),
    _flag("buyer_is_maker"),
    *_ints("event_time"),
    *_received(),
)

reference_prices = Table(
    "reference_prices",
    metadata,
    _symbol(),
    _key("time"),
    Column("reference_price", Float, nullable=True),  # Binance sends null when there is none
    *_received(),
)

# Futures (`streams.MARKETS`): a market's tables are its prefix + a base name below,
# one definition per base name for both markets. The kinds spot has keep spot's columns
# and add what Binance's futures payloads carry besides.


def _futures_book_ticker_columns() -> list[Column[Any]]:
    return [*_book_ticker_columns(), *_ints("event_time", "transaction_time")]


def _futures_depth_update_columns() -> list[Column[Any]]:
    """`pu` (the previous event's final update id) is how futures books check continuity."""
    return [*_depth_update_columns(), *_ints("prev_final_update_id", "transaction_time")]


def _futures_partial_depth_columns() -> list[Column[Any]]:
    """Futures' `@depth<N>` payload is a whole depth event (`s`, `U`, `u`, `pu`, `E`, `T`)
    holding the top N levels; last_update_id is its `u`."""
    return [
        *_partial_depth_columns(),
        *_ints("first_update_id", "prev_final_update_id", "event_time", "transaction_time"),
    ]


def _mark_price_columns() -> list[Column[Any]]:
    """`markPrice[@1s]`, `!markPrice@arr`. Funding rate and next funding time are NULL
    where Binance sends none (COIN-M delivery contracts: `r` "", `T` 0); index and
    estimated settle price are NULL in the old payloads that lacked them."""
    return [
        _symbol(),
        _key("event_time"),
        *_reals("mark_price"),
        *_reals("index_price", "estimated_settle_price", "funding_rate", nullable=True),
        *_ints("next_funding_time", nullable=True),
    ]


def _liquidation_columns() -> list[Column[Any]]:
    """`forceOrder`, `!forceOrder@arr`: one liquidation order per event, every field of it.

    Binance gives a liquidation no id, so the key is the whole event: symbol, trade
    and event time, and every field of the order. The same event received twice (a
    connection rotation, or both the symbol's and the all-market stream) is one row;
    two liquidations that differ in anything, even within one millisecond, are two.
    A narrower key such as (symbol, trade_time) would silently drop the second of two
    orders filled in one millisecond. Binance sends at most one order per symbol per
    second: the table is lossy by design.
    """
    return [
        _symbol(),
        _key("trade_time"),
        _key("event_time"),
        *_texts("side", "order_type", "time_in_force", "status", key=True),
        *_reals("orig_qty", "price", "avg_price", "last_filled_qty", "accumulated_qty", key=True),
    ]


def _continuous_kline_columns() -> list[Column[Any]]:
    """`<pair>_<contract type>@continuousKline_<i>`: the klines of a pair's perpetual,
    current-quarter or next-quarter contract, whichever symbol that is at the time.
    Its first and last ids are update ids, not trade ids."""
    return [
        *_texts("pair", "contract_type", key=True),
        _interval(),
        _key("open_time"),
        *_candle_columns(),
        *_kline_volume_columns(),
        *_ints("first_update_id", "last_update_id", nullable=True),
        _flag("is_closed"),
        *_ints("event_time", nullable=True),
    ]


def _price_kline_columns(subject: Column[Any]) -> list[Column[Any]]:
    """Klines of a price that trades do not make: a contract's mark price
    (`<symbol>@markPriceKline_<i>`, `subject` its symbol), a pair's index price
    (`<pair>@indexPriceKline_<i>`, its pair). No volumes, counts or ids: Binance's
    fields for them are "ignore"."""
    return [
        subject,
        _interval(),
        _key("open_time"),
        *_candle_columns(),
        _flag("is_closed"),
        *_ints("event_time", nullable=True),
    ]


def _index_price_columns() -> list[Column[Any]]:
    """COIN-M's `<pair>@indexPrice[@1s]`."""
    return [*_texts("pair", key=True), _key("event_time"), *_reals("index_price")]


def _composite_index_columns() -> list[Column[Any]]:
    """USDⓈ-M's `<symbol>@compositeIndex`: the index price of a composite symbol and
    its components, kept as Binance's JSON list (base asset `b`, quote asset `q`,
    weight in quantity `w` and in percent `W`, index price `i`), one row per event."""
    return [
        _symbol(),
        _key("event_time"),
        *_reals("price"),
        *_texts("component_type", nullable=True),  # `C`, e.g. "baseAsset"
        Column("components", Text, nullable=False),
    ]


def _contract_info_columns() -> list[Column[Any]]:
    """USDⓈ-M's `!contractInfo`: a contract listed or its status changed (`TRADING`,
    `DELIVERING`, `SETTLING`...), one row per event. Its brackets (`bks`, the leverage
    tiers, sent only on some changes) are left out: they are account limits, not market data."""
    return [
        _symbol(),
        _key("event_time"),
        *_texts("pair", "contract_type"),
        *_ints("delivery_date", "onboard_date"),
        *_texts("status"),
    ]


def _open_interest_columns() -> list[Column[Any]]:
    """`GET /fapi/v1/openInterest` (`/dapi`), polled: Binance streams no open interest."""
    return [_symbol(), _key("time"), *_reals("open_interest")]


def _funding_rate_columns() -> list[Column[Any]]:
    """`GET /fapi/v1/fundingRate` (`/dapi`): each funding event; older ones lack the mark price."""
    return [_symbol(), _key("funding_time"), *_reals("funding_rate"), *_reals("mark_price", nullable=True)]


_FUTURES_TABLES: dict[str, tuple[Callable[[], list[Column[Any]]], str]] = {
    "trades": (lambda: [*_trade_columns(), *_texts("trade_type", nullable=True)], "trade_time"),  # `X`
    "agg_trades": (lambda: [*_agg_trade_columns(), *_reals("normal_qty", nullable=True)], "trade_time"),  # `nq`
    "klines": (_kline_columns, "open_time"),
    "tickers": (lambda: _ticker_columns(spot=False), "event_time"),
    "mini_tickers": (_mini_ticker_columns, "event_time"),
    "book_tickers": (_futures_book_ticker_columns, "event_time"),
    "depth_updates": (_futures_depth_update_columns, "event_time"),
    "depth_snapshots": (_depth_snapshot_columns, "received_at"),
    "partial_depth": (_futures_partial_depth_columns, "event_time"),
    "mark_prices": (_mark_price_columns, "event_time"),
    "liquidations": (_liquidation_columns, "trade_time"),
    "continuous_klines": (_continuous_kline_columns, "open_time"),
    "mark_price_klines": (lambda: _price_kline_columns(_symbol()), "open_time"),
    "index_price_klines": (lambda: _price_kline_columns(*_texts("pair", key=True)), "open_time"),
    "index_prices": (_index_price_columns, "event_time"),
    "composite_index": (_composite_index_columns, "event_time"),
    "contract_info": (_contract_info_columns, "event_time"),
    "open_interest": (_open_interest_columns, "time"),
    "funding_rates": (_funding_rate_columns, "funding_time"),
}
"""Base table name -> (its columns, its time column) in the futures markets. Unlike
spot's, futures book tickers and partial depth carry Binance's event time, so that is
their time column."""

FUTURES_TABLES: dict[str, Table] = {
    market.table_prefix + base: Table(market.table_prefix + base, metadata, *_FUTURES_TABLES[base][0](), *_received())
    for market in FUTURES_MARKETS
    for base in market.base_tables
}
"""The futures markets' tables by name: `usdm_trades`, `coinm_mark_prices`..."""

# Not a data table (not in TABLES): the backfill task's record of missing ids and kline
# slots. Unique on where a gap starts, so finding the same hole again adds no row.
gaps = Table(
    "gaps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(32), nullable=False),
    Column("kind", String(16), nullable=False),  # trade, aggTrade, kline_<interval>, depth
    # Ids, or open times (ms) for klines; both ends missing. For depth: the event times
    # (ms) of the last update before the book became unknown and the first after.
    *_ints("first_missing", "last_missing", "found_at"),
    *_ints("filled_at", nullable=True),
    Column("status", String(16), nullable=False),  # open, filled, unfillable
    Column("rows_fetched", BigInteger, nullable=False, default=0),
    Column("reason", Text, nullable=True),  # why it is unfillable
    UniqueConstraint("symbol", "kind", "first_missing"),
)

# One row per symbol, kind and UTC day: the latest audit of our rows against the public
# data archive and REST (worker/exchange/audit.py); auditing the day again replaces it.
audits = Table(
    "audits",
    metadata,
    Column("symbol", String(32), primary_key=True),
    Column("kind", String(16), primary_key=True),  # trade, aggTrade
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD (UTC)
    Column("verdict", String(24), nullable=False),  # verified, differs, archive_missing, recording_incomplete
    Column("wrong", String(32), nullable=False),  # the sources REST contradicts: "", archive, recording, both
    *_ints("rest_rows", "recorded_rows", "audited_at"),
    *_ints("archive_rows", "kline_trades", nullable=True),
    Column("details", Text, nullable=False),  # the first differences, one per line
)

# Not a data table: the day files written by the archiver (worker/store/dayfiles.py), one
# row per data table, UTC day and symbol (or pair). `rows` is what the file holds,
# `db_rows` what the database held of that day when the archiver last looked: a day
# whose count in the database differs from it has changed since (late rows, or rows
# deleted), and retention deletes a day only while the two agree.
archived_days = Table(
    "archived_days",
    metadata,
    Column("table_name", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("symbol", String(32), primary_key=True),
    *_ints("rows", "db_rows", "bytes", "written_at"),
    Column("path", Text, nullable=False),  # relative to ARCHIVE_DIR
)

# Not a data table (not in TABLES): the status changes of the futures contracts the
# recorder followed (subscribed, or listed for a market subscription), noticed by
# tasks.follow_listings (worker/exchange/listings.py); a symbol that stopped trading was
# unsubscribed at `changed_at`. `old_status` is NULL for a new listing, or when the
# symbol was subscribed before its status was first noted.
listing_changes = Table(
    "listing_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(32), nullable=False),
    Column("market", String(8), nullable=False),
    Column("changed_at", BigInteger, nullable=False),
    Column("old_status", String(24), nullable=True),
    Column("new_status", String(24), nullable=False),
    UniqueConstraint("symbol", "market", "changed_at"),
)

# Not a data table: the first exchangeInfo answer the listing follower read on each UTC
# day, per market, as JSON text (tasks.follow_listings, worker/exchange/listings.py), so
# that a replay can serve the listing of that day.
exchange_info_snapshots = Table(
    "exchange_info_snapshots",
    metadata,
    Column("market", String(8), primary_key=True),
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("taken_at", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
)

# Keeps the shape of the original script's table for the people who query it.
market_data = CreateView(
    select(trades.c.symbol, trades.c.price, trades.c.trade_time.label("timestamp")),
    "market_data",
    metadata=metadata,
)

TABLES: dict[str, Table] = {
    **{
        table.name: table
        for table in (
            trades, agg_trades, klines, tickers, mini_tickers, book_tickers, avg_prices,
            depth_updates, depth_snapshots, partial_depth, window_tickers, block_trades, reference_prices,
        )
    },
    **FUTURES_TABLES,
}  # fmt: skip
"""The data tables by name, spot's then the futures markets' (the view is not one of
them: nothing inserts into it)."""

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {name: tuple(table.columns.keys()) for name, table in TABLES.items()}
"""Column order per table: the order of the values in every row tuple."""

TIME_COLUMNS: dict[str, str] = {
    "trades": "trade_time",
    "agg_trades": "trade_time",
    "klines": "open_time",
    "tickers": "event_time",
    "mini_tickers": "event_time",
    "book_tickers": "received_at",
    "avg_prices": "event_time",
    "depth_updates": "event_time",
    "depth_snapshots": "received_at",
    "partial_depth": "received_at",
    "window_tickers": "event_time",
    "block_trades": "trade_time",
    "reference_prices": "time",
    **{
        market.table_prefix + base: _FUTURES_TABLES[base][1]
        for market in FUTURES_MARKETS
        for base in market.base_tables
    },
}
"""The column (ms since the epoch) that says when a row happened: for status (newest
row), retention (rows past their age) and exports."""


def _index_time_columns() -> None:
    """Index every table's time column.

    Retention deletes `WHERE time < cutoff` in chunks inside write transactions; without
    an index each run scans whole tables while holding SQLite's write lock (33 ms per
    million rows when cached, far longer from disk), with one it reads only the rows it
    deletes. Measured with 1M trades of 400 interleaved symbols: the drain (parse and
    insert) goes from 0.68x to 0.56x of plain sqlite3 executemany, because times only
    grow and each index insert lands on the same last page. It also makes status's
    newest-row query a lookup.
    """
    for name, column in TIME_COLUMNS.items():
        Index(f"ix_{name}_{column}", TABLES[name].c[column])


_index_time_columns()


def _index_depth_updates() -> None:
    """A book at an instant starts from the symbol's last update at or before it.
    Without this index SQLite reads every stored update of the symbol (36,000 an hour
    at 100 ms) and sorts them; with it, one seek. Its cost on the drain: see
    docs/order-books.md. The futures markets' depth tables are books alike."""
    for name in ("depth_updates", *(market.table_prefix + "depth_updates" for market in FUTURES_MARKETS)):
        Index(f"ix_{name}_symbol_event_time", TABLES[name].c.symbol, TABLES[name].c.event_time)


_index_depth_updates()


def _index_depth_receive_times() -> None:
    """A replay reads a window's diffs by receive time (`worker.replay.events`); without
    this index SQLite scans the whole table (and sorts the window) for each of the
    replay's first queries: 3.3 s of them before a replay from the middle of an hour of
    20 symbols' diffs (720,000 rows) could send, 0.17 s with it (bench part 9).
    `symbol` makes it cover the query for a window's symbols. Only depth: its rows are
    large (20 levels pack to 330 bytes), so the index adds little to them, where on
    trades it would cost the drain what the time index did."""
    Index("ix_depth_updates_received_at", depth_updates.c.received_at, depth_updates.c.symbol)


_index_depth_receive_times()

UPSERTED_TABLES = frozenset(name for name, table in TABLES.items() if "is_closed" in table.c)
"""The kline tables (spot's and the futures markets' of every price): an open kline is
updated until it closes, so a later row of the same key replaces an open one."""

_DIALECT_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}

# create_all checks, then creates; another process starting at the same time can create
# a table (or add a column) in between. Each such collision means a competitor made
# progress, so one attempt per schema object and per table that may gain a column, plus
# one, always gets through.
_SCHEMA_ATTEMPTS = 1 + len(metadata.tables) + len(TABLES)


def make_engine(url: str, busy_timeout_ms: int = 10000) -> Engine:
    """An engine for `url`; SQLite files get their directory and their pragmas.

    The pragmas are set on every new DBAPI connection because SQLite keeps them per
    connection (except journal_mode, which sticks to the file): WAL lets the readers
    (status, Flower, analysts) run while the drain writes; busy_timeout makes a writer
    wait for the lock instead of failing at once; synchronous=NORMAL is safe in WAL
    mode and saves an fsync per commit.
    """
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _create_parent_directory(engine.url.database)
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
    return engine


def _create_parent_directory(database: str | None) -> None:
    """Let the default `sqlite:///data/binance.db` work in a fresh checkout."""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def set_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # First, so that switching to WAL waits for a lock held by another process.
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _switch_to_wal(cursor, busy_timeout_ms / 1000)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return set_pragmas


def _switch_to_wal(cursor: Any, patience_seconds: float) -> None:
    """Switching a new file to WAL needs an exclusive lock, and SQLite answers "database
    is locked" at once (no busy wait) when several processes open a fresh file together,
    as the workers of a new stack do. Once the file is in WAL mode the pragma is free."""
    deadline = time.monotonic() + patience_seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def create_schema(engine: Engine, partitioned: bool = True, now_ms: int | None = None) -> None:
    """Create the missing tables and the view; run it on every start, from any process.

    On PostgreSQL the big event tables of a new database are created partitioned by day
    (worker/store/partitions.py; `partitioned=False` makes them plain, as older versions
    did), and the daily partitions from `now_ms`'s day (default: now) on are created.
    """
    from worker.store import partitions  # here: partitions builds on this module's tables

    for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
        try:
            if partitioned and engine.dialect.name == "postgresql":
                with engine.begin() as conn:
                    partitions.create_partitioned_tables(conn)
            metadata.create_all(engine, checkfirst=True)
            _add_missing_columns(engine)
            _create_missing_indexes(engine)
            break
        except exc.DatabaseError as error:
            if attempt == _SCHEMA_ATTEMPTS or not _lost_creation_race(error):
                raise
    partitions.ensure_partitions(engine, times.now_ms() if now_ms is None else now_ms)


def _add_missing_columns(engine: Engine) -> None:
    """create_all leaves an existing table as it is, so a database made by an older
    version lacks the nullable columns added since (`received_at`); this adds them, NULL
    in the old rows. Another process starting at the same time may add one first: its
    "duplicate column" error is a lost race, which `create_schema` retries."""
    with engine.begin() as conn:
        present = {name: {c["name"] for c in inspect(conn).get_columns(name)} for name in TABLES}
        for name, table in TABLES.items():
            for column in table.columns:
                if column.name not in present[name]:
                    column_type = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {column.name} {column_type}")


def _create_missing_indexes(engine: Engine) -> None:
    """create_all skips every index of a table that exists, so a database made by an
    older version would never get an index added later; this adds them."""
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)


def _lost_creation_race(error: exc.DatabaseError) -> bool:
    """Another process created the object first: "table trades already exists" (or
    "duplicate column name" for an added column) on SQLite; on PostgreSQL "already
    exists", or a unique violation in the catalog when both statements ran at once."""
    message = str(error.orig)
    return isinstance(error, exc.IntegrityError) or "already exists" in message or "duplicate column" in message


def store_rows(conn: Connection, rows_by_table: Mapping[str, Sequence[tuple]]) -> dict[str, int]:
    """Insert each table's rows in the caller's transaction; return the rows written.

    A row whose key is already stored is skipped (it is a replay of a batch or a
    backfill overlap), except in the kline tables (`UPSERTED_TABLES`), where it
    replaces the stored row while that row is still open: an open kline is updated until it closes, and an update that
    arrives late never overwrites a closed one. So the counts are the rows inserted or
    updated; a batch stored twice reports 0 the second time.
    """
    return {name: _execute_many(conn, name, rows) if rows else 0 for name, rows in rows_by_table.items()}


def _execute_many(conn: Connection, table_name: str, rows: Sequence[tuple]) -> int:
    if conn.dialect.name == "sqlite":
        # The tuples go straight to sqlite3's executemany: no per-row work in Python.
        sql = _compiled_sql(conn.dialect, table_name)
        return conn.exec_driver_sql(sql, rows if isinstance(rows, list) else list(rows)).rowcount
    if conn.dialect.name == "postgresql" and table_name not in UPSERTED_TABLES:
        return _copy_then_insert(conn, table_name, rows)
    columns = TABLE_COLUMNS[table_name]
    statement = _insert_statement(conn.dialect.name, table_name)
    parameters = [dict(zip(columns, row, strict=True)) for row in rows]
    # Without preserve_rowcount, SQLAlchemy 2.1 reports -1 for an executemany.
    return conn.execute(statement, parameters, execution_options={"preserve_rowcount": True}).rowcount


_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE for a duplicate key


def _copy_then_insert(conn: Connection, table_name: str, rows: Sequence[tuple]) -> int:
    """PostgreSQL's bulk path: COPY the batch straight into the table; if some of its
    keys are stored already (a replayed batch, a rotation overlap, a backfill), undo
    that COPY and take the batch through a staging table and one
    INSERT ... SELECT ... ON CONFLICT DO NOTHING instead.

    COPY itself cannot skip a stored key, and psycopg's executemany sends one
    statement per row. Measured on 200,000 trade rows in 5,000-row transactions on a
    loaded 2-core machine: executemany 18,700 rows/s; staging then insert-or-ignore
    0.35-0.43 of plain COPY for the whole drain (the INSERT ... SELECT took twice the
    COPY); COPY first, as here, see the PostgreSQL figures in docs/postgresql.md. Klines do not
    come here: their upsert may meet the same key twice in one batch.
    """
    # Quoted: some column names (window) are reserved words in PostgreSQL.
    quote = conn.dialect.identifier_preparer.quote
    columns = ", ".join(quote(column) for column in TABLE_COLUMNS[table_name])
    driver_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("SAVEPOINT bulk_copy")
        try:
            _copy(cursor, table_name, columns, rows)
        except driver_error as error:
            if getattr(error, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT bulk_copy")
            return _insert_through_staging(cursor, table_name, columns, rows)
        cursor.execute("RELEASE SAVEPOINT bulk_copy")
        return len(rows)
    except driver_error as error:
        # The driver's own cursor bypasses SQLAlchemy's wrapping: wrap as it would, so
        # callers see IntegrityError, OperationalError... on every path.
        raise exc.DBAPIError.instance(f"COPY {table_name}", None, error, driver_error) from error
    finally:
        cursor.close()


def _copy(cursor: Any, table_name: str, columns: str, rows: Sequence[tuple]) -> None:
    with cursor.copy(f"COPY {table_name} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _insert_through_staging(cursor: Any, table_name: str, columns: str, rows: Sequence[tuple]) -> int:
    """The rows not stored yet, once each (a batch may repeat a key too)."""
    staging = f"staging_{table_name}"
    # A temporary table lives as long as the session (the pooled connection), and
    # ON COMMIT DELETE ROWS empties it at every commit; a rollback takes its rows too.
    cursor.execute(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {table_name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    _copy(cursor, staging, columns, rows)
    cursor.execute(f"INSERT INTO {table_name} ({columns}) SELECT {columns} FROM {staging} ON CONFLICT DO NOTHING")
    inserted = int(cursor.rowcount)
    cursor.execute(f"TRUNCATE {staging}")  # for a second batch of this table in the same transaction
    return inserted


@functools.cache
def _compiled_sql(dialect: Dialect, table_name: str) -> str:
    """The statement as SQL text with positional parameters in `TABLE_COLUMNS` order."""
    return str(_insert_statement(dialect.name, table_name).compile(dialect=dialect))


def insert_or_ignore(dialect_name: str, table: Table) -> Insert:
    """An INSERT that skips rows colliding with a primary key or unique constraint."""
    return _dialect_insert(dialect_name, table).on_conflict_do_nothing()


def _dialect_insert(dialect_name: str, table: Table) -> Any:
    try:
        insert = _DIALECT_INSERTS[dialect_name]
    except KeyError:
        raise ValueError(f"unsupported database {dialect_name!r}: use SQLite or PostgreSQL") from None
    return insert(table)


@functools.cache
def _insert_statement(dialect_name: str, table_name: str) -> Insert:
    """Insert-or-ignore, except for klines: upsert while the stored kline is open, and
    only by a version of it no older than the stored one (by event time; a REST kline has
    none and replaces an open one, as a closed one does).

    So the stored kline never goes back, whatever order its versions are committed in:
    two drain runs may store one symbol's frames at once, from two lists, when regrouping
    moves its streams (see `worker.store.drain`), and the last to commit may hold the
    older version. PostgreSQL evaluates the WHERE against the row the other transaction
    committed (the conflicting insert waits for it), SQLite has one writer at a time."""
    table = TABLES[table_name]
    if table_name not in UPSERTED_TABLES:
        return insert_or_ignore(dialect_name, table)
    statement = _dialect_insert(dialect_name, table)
    newer = statement.excluded.event_time
    return statement.on_conflict_do_update(
        index_elements=list(table.primary_key.columns),
        set_={column.name: statement.excluded[column.name] for column in table.columns if not column.primary_key},
        where=and_(
            table.c.is_closed == false(),
            or_(newer.is_(None), table.c.event_time.is_(None), newer >= table.c.event_time),
        ),
    )
