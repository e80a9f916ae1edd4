"""PostgreSQL's daily partitions, against the session's real PostgreSQL server."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.test_retention import row
from tests.test_storage import SAMPLE_ROWS, batch_of_samples
from worker.ops.local_postgres import PostgresServer
from worker.store import partitions
from worker.store.partitions import (
    DAY_MS,
    DAYS_AHEAD,
    PARTITIONED_TABLES,
    day_start,
    default_partition_name,
    ensure_partitions,
    partition_name,
)
from worker.store.retention import RetentionPolicy, delete_expired_rows
from worker.store.storage import TABLES, TIME_COLUMNS, create_schema, make_engine, store_rows
from worker.times import now_ms

DAY0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC


@pytest.fixture
def pg(postgres_server: PostgresServer) -> Any:
    engine = make_engine(postgres_server.create_database())
    create_schema(engine)
    yield engine
    engine.dispose()


def relkind(engine: Engine, table: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("select relkind from pg_class where oid = to_regclass(:t)"), {"t": table}).scalar_one()


def where_rows_are(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    """(partition, key...) of every row, by time."""
    key = ", ".join(c.name for c in TABLES[table].primary_key.columns)
    with engine.connect() as conn:
        rows = conn.execute(text(f"select tableoid::regclass::text, {key} from {table} order by {TIME_COLUMNS[table]}"))
        return [tuple(r) for r in rows]


def store(engine: Engine, table: str, times: list[int], first_n: int = 1) -> None:
    with engine.begin() as conn:
        store_rows(conn, {table: [row(table, first_n + i, at) for i, at in enumerate(times)]})


def test_a_new_database_partitions_the_big_tables_by_day(pg: Engine) -> None:
    assert {t: relkind(pg, t) for t in TABLES} == {t: "p" if t in PARTITIONED_TABLES else "r" for t in TABLES}
    with pg.connect() as conn:
        key = conn.execute(
            text(
                "select array_agg(a.attname order by k.n) from pg_index i, unnest(i.indkey) with ordinality k(att, n)"
                " join pg_attribute a on a.attnum = k.att where i.indrelid = 'trades'::regclass"
                " and i.indisprimary and a.attrelid = 'trades'::regclass"
            )
        ).scalar_one()
        found = partitions.list_partitions(conn, "trades")
    assert key == ["symbol", "trade_id", "trade_time"]
    today = day_start(now_ms())
    assert [p.name for p in found] == [default_partition_name("trades")] + [
        partition_name("trades", today + n * DAY_MS) for n in range(DAYS_AHEAD + 1)
    ]
    assert (found[1].lower, found[1].upper) == (today, today + DAY_MS)


def test_the_time_column_of_a_partitioned_table_is_never_null() -> None:
    """It is part of the key; the tables whose time may be NULL stay plain."""
    assert all(not TABLES[t].c[TIME_COLUMNS[t]].nullable for t in PARTITIONED_TABLES)
    with pytest.raises(ValueError, match=r"book_tickers.received_at may be NULL"):
        partitions.partitioned_table(TABLES["book_tickers"])


def test_rows_land_in_their_days_partition_and_the_rest_in_the_default_one(pg: Engine) -> None:
    created = ensure_partitions(pg, DAY0, days_back=1, days_ahead=1)
    assert sorted(created.created) == sorted(
        partition_name(t, DAY0 + n * DAY_MS) for t in PARTITIONED_TABLES for n in (-1, 0, 1)
    )
    assert ensure_partitions(pg, DAY0, days_back=1, days_ahead=1).created == []  # idempotent
    store(pg, "trades", [DAY0 - 1, DAY0, DAY0 + DAY_MS - 1, DAY0 + DAY_MS, DAY0 + 5 * DAY_MS, DAY0 - 400 * DAY_MS])
    assert where_rows_are(pg, "trades") == [
        ("trades_default", "BTCUSDT", 6),
        ("trades_p20251231", "BTCUSDT", 1),
        ("trades_p20260101", "BTCUSDT", 2),
        ("trades_p20260101", "BTCUSDT", 3),
        ("trades_p20260102", "BTCUSDT", 4),
        ("trades_default", "BTCUSDT", 5),
    ]


def test_the_same_frames_stored_twice_are_one_row(pg: Engine) -> None:
    ensure_partitions(pg, SAMPLE_ROWS["trades"][4], days_back=1, days_ahead=1)
    with pg.begin() as conn:
        first = store_rows(conn, batch_of_samples())
    with pg.begin() as conn:  # COPY meets the stored keys: the staging path
        again = store_rows(conn, batch_of_samples())
    newer = row("trades", 2, SAMPLE_ROWS["trades"][4] + 1)
    with pg.begin() as conn:  # a batch with one stored row, one new row, and that new row twice
        mixed = store_rows(conn, {"trades": [SAMPLE_ROWS["trades"], newer, newer]})
    assert first == dict.fromkeys(TABLES, 1)
    assert again == dict.fromkeys(TABLES, 0)
    assert mixed == {"trades": 1}
    assert where_rows_are(pg, "trades") == [("trades_p20231114", "BTCUSDT", 1), ("trades_p20231114", "BTCUSDT", 2)]
    with pg.connect() as conn:
        assert {t: conn.execute(text(f"select count(*) from {t}")).scalar_one() for t in TABLES} == {
            **dict.fromkeys(TABLES, 1),
            "trades": 2,
        }


def test_retention_drops_old_partitions_and_deletes_the_boundary_in_chunks(pg: Engine) -> None:
    ensure_partitions(pg, DAY0, days_ahead=3)
    hour = DAY_MS // 24
    # 6 rows per day for four days (one every 4 hours), and 3 from long ago.
    store(pg, "trades", [DAY0 + n * 4 * hour for n in range(24)])
    store(pg, "trades", [DAY0 - 100 * DAY_MS + n for n in range(3)], first_n=100)
    cutoff = DAY0 + 2 * DAY_MS + 10 * hour  # keeps 3 rows of the third day (12h, 16h, 20h)
    policy = RetentionPolicy(default_days=0, overrides={"trades": 30}, chunk_rows=2)

    run = delete_expired_rows(pg, policy, cutoff + 30 * DAY_MS)

    assert run.methods == {"trades": "partitions"}
    assert run.dropped == {"trades": ["trades_p20260101", "trades_p20260102"]}
    assert run.dropped_rows == {"trades": 12}
    assert run.deleted == {"trades": 3 + 3}  # the old rows from the default partition, 3 of the third day
    assert run.chunks == 2 + 2  # per partition: 2 + 1 rows, then 2 + 1
    with pg.connect() as conn:
        left = [p.name for p in partitions.list_partitions(conn, "trades")]
    assert left[:3] == ["trades_default", "trades_p20260103", "trades_p20260104"]  # then today's and after
    assert [r[2] for r in where_rows_are(pg, "trades")] == list(range(16, 25))
    assert delete_expired_rows(pg, policy, cutoff + 30 * DAY_MS).deleted == {"trades": 0}


def test_a_day_with_rows_in_the_default_partition_is_skipped_and_its_rows_still_expire(pg: Engine) -> None:
    store(pg, "trades", [DAY0 + 1, DAY0 + 2])  # no partition for that day yet: the default one
    ensured = ensure_partitions(pg, DAY0, days_ahead=1)
    assert list(ensured.skipped) == ["trades_p20260101"]
    assert "would be violated by some row" in ensured.skipped["trades_p20260101"]
    assert "trades_p20260102" in ensured.created
    store(pg, "trades", [DAY0 + 3, DAY0 + DAY_MS], first_n=3)
    assert [r[0] for r in where_rows_are(pg, "trades")] == ["trades_default"] * 3 + ["trades_p20260102"]
    run = delete_expired_rows(pg, RetentionPolicy(0, {"trades": 1}, 100), DAY0 + 2 * DAY_MS)
    assert (run.deleted, run.dropped) == ({"trades": 3}, {})
    assert [r[2] for r in where_rows_are(pg, "trades")] == [4]


def test_a_database_of_plain_tables_keeps_them_and_its_chunked_deletes(postgres_server: PostgresServer) -> None:
    engine = make_engine(postgres_server.create_database())
    create_schema(engine, partitioned=False)  # as versions before partitioning made it
    store(engine, "trades", [DAY0, DAY0 + 1, DAY0 + 2 * DAY_MS])
    create_schema(engine)  # this version starting on it
    assert {relkind(engine, t) for t in TABLES} == {"r"}
    assert ensure_partitions(engine, DAY0).created == []
    store(engine, "trades", [DAY0, DAY0 + 1, DAY0 + 2 * DAY_MS])  # the same rows again: nothing new
    run = delete_expired_rows(engine, RetentionPolicy(0, {"trades": 1}, 1), DAY0 + 2 * DAY_MS)
    assert (run.methods, run.deleted, run.dropped, run.chunks) == ({"trades": "chunks"}, {"trades": 2}, {}, 3)
    assert [r[1:] for r in where_rows_are(engine, "trades")] == [("BTCUSDT", 3)]
    engine.dispose()
