"""Audit one recorded UTC day three ways: our rows, the public data archive's file, REST.

No tool checks a live recording against the archive and REST row by row, and both of
the others can be wrong: the archive has had truncated days, duplicates and re-uploads
that differ from REST (binance-public-data #354, #412, #203, #293, #375), and a
recording misses what fell into a gap the backfill could not fill. So the day's trades
(or aggregate trades) are compared on their natural key, the id: ids missing on each
side, ids seen twice, differing price, quantity, time or flags, and each source's
count against the 1d kline's trade count. REST is the archive's own source and has
been right where the two disagreed, so REST decides; the verdict says which source
was wrong. The result replaces the day's row of the `audits` table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

import redis
from sqlalchemy import delete, inspect, select
from sqlalchemy.engine import Engine

from worker.exchange.archive import (
    DAY_MS,
    ArchiveUnavailable,
    BinanceArchive,
    day_start_ms,
    day_trade_count,
    first_key,
    utc_day,
)
from worker.exchange.history import AggTradeSeries, Row, Series, series_for, series_of_streams
from worker.exchange.rest import MAX_LIMIT, BinanceRest
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import Settings
from worker.store.storage import TABLE_COLUMNS, audits
from worker.times import now_ms

AUDIT_KINDS = ("trade", "aggTrade")
COMPARED = {
    "trades": ("price", "qty", "trade_time", "buyer_is_maker"),
    "agg_trades": ("price", "qty", "first_trade_id", "last_trade_id", "trade_time", "buyer_is_maker"),
}
"""What must agree between sources, besides the id (not event or receive times:
only the websocket has them)."""
FIRST_DIFFERENCES = 10
VERIFIED, DIFFERS, ARCHIVE_MISSING, RECORDING_INCOMPLETE = (
    "verified",
    "differs",
    "archive_missing",
    "recording_incomplete",
)


@dataclass
class Side:
    """One source's rows of the day: the compared values by id, and ids seen twice."""

    values: dict[int, tuple[Any, ...]]
    rows: int = 0
    repeated: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, series: Series, rows: Iterable[Row]) -> Side:
        columns = TABLE_COLUMNS[series.table_name]
        picks = [columns.index(name) for name in COMPARED[series.table_name]]
        values: dict[int, tuple[Any, ...]] = {}
        seen: Counter[int] = Counter()
        for row in rows:
            key = row[series.key_index]
            seen[key] += 1
            values[key] = tuple(row[i] for i in picks)
        return cls(values, sum(seen.values()), sorted(key for key, times in seen.items() if times > 1))

    def contradicts(self, truth: Side) -> bool:
        """Whether this side has rows REST does not, repeats or differs (lacking rows is not contradicting)."""
        common = self.values.keys() & truth.values.keys()
        return bool(self.repeated or self.values.keys() - truth.values.keys()) or any(
            self.values[key] != truth.values[key] for key in common
        )


@dataclass
class Audit:
    """The outcome of one symbol-kind-day; `details` lists the first differences."""

    symbol: str
    kind: str
    day: str
    verdict: str
    wrong: str
    rest_rows: int
    recorded_rows: int
    archive_rows: int | None
    kline_trades: int | None
    details: list[str]

    def summary(self) -> str:
        archive = "-" if self.archive_rows is None else self.archive_rows
        blame = f" ({self.wrong} wrong)" if self.wrong else ""
        return (
            f"{self.symbol} {self.kind} {self.day}: {self.verdict}{blame}; rows: REST {self.rest_rows}, "
            f"recorded {self.recorded_rows}, archive {archive}, 1d kline trades {self.kline_trades}"
        )


def audit_day(engine: Engine, rest: BinanceRest, archive: BinanceArchive, symbol: str, kind: str, day: date) -> Audit:
    """Compare the day's rows of the three sources and store the verdict."""
    series = series_for(symbol, kind)
    if kind not in AUDIT_KINDS:
        raise ValueError(f"{kind!r} cannot be audited: use {' or '.join(AUDIT_KINDS)}")
    start = day_start_ms(day)
    count = day_trade_count(rest, symbol, start)
    truth = Side.of(series, rest_day(rest, series, start))
    recorded = Side.of(series, recorded_day(engine, series, start))
    details: list[str] = []
    try:
        archived: Side | None = Side.of(series, (row for batch in archive.rows(series, day) for row in batch))
    except ArchiveUnavailable as error:
        archived = None
        details.append(f"archive: {error}")
    archive_lines = differences("archive", series, truth, archived) if archived else []
    recording_lines = differences("recording", series, truth, recorded)
    recording_missing = bool(truth.values.keys() - recorded.values.keys())
    wrong = [name for name, bad in (("archive", archive_lines), ("recording", recording_lines)) if bad]
    if recorded.contradicts(truth) or archive_lines:
        verdict = DIFFERS
    elif recording_missing:
        verdict = RECORDING_INCOMPLETE
    else:
        verdict = ARCHIVE_MISSING if archived is None else VERIFIED
    details += _counts(series, count, truth, recorded, archived) + archive_lines + recording_lines
    audit = Audit(
        symbol, series.kind, day.isoformat(), verdict, "+".join(wrong), len(truth.values), len(recorded.values),
        None if archived is None else archived.rows, count, details,
    )  # fmt: skip
    save(engine, audit)
    return audit


def rest_day(rest: BinanceRest, series: Series, start: int) -> Iterator[Row]:
    """REST's rows of the day, page by page from its first id until a row of the next day."""
    cursor = first_key(rest, series, start, start + DAY_MS)
    while cursor is not None:
        page = series.fetch(rest, cursor, None, MAX_LIMIT)
        for row in page:
            if row[series.time_index] >= start + DAY_MS:
                return
            yield row
        if len(page) < MAX_LIMIT:
            return
        cursor = page[-1][series.key_index] + series.step


def recorded_day(engine: Engine, series: Series, start: int, limit: int | None = None) -> list[Row]:
    """Our rows of the day starting at `start` (the first `limit` of them, if given)."""
    table = series.table
    time = table.c[series.time_column]
    columns = [table.c[name] for name in TABLE_COLUMNS[series.table_name]]
    query = select(*columns).where(series.selects(), time >= start, time < start + DAY_MS).limit(limit)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def differences(name: str, series: Series, truth: Side, side: Side) -> list[str]:
    """What `side` gets wrong against REST: one line per kind of difference, first ids named."""
    missing = sorted(truth.values.keys() - side.values.keys())
    extra = sorted(side.values.keys() - truth.values.keys())
    differing = [
        key for key in sorted(truth.values.keys() & side.values.keys()) if truth.values[key] != side.values[key]
    ]
    lines = []
    if missing:
        lines.append(f"{name} lacks {len(missing)} {series.keys_are}: {_runs(missing)}")
    if extra:
        lines.append(f"{name} has {len(extra)} {series.keys_are} REST does not: {_runs(extra)}")
    if side.repeated:
        lines.append(f"{name} repeats {len(side.repeated)} {series.keys_are}: {_runs(side.repeated)}")
    columns = COMPARED[series.table_name]
    for key in differing[:FIRST_DIFFERENCES]:
        pairs = zip(columns, side.values[key], truth.values[key], strict=True)
        what = ", ".join(f"{column} {mine!r} (REST {theirs!r})" for column, mine, theirs in pairs if mine != theirs)
        lines.append(f"{name} differs at {series.key_column} {key}: {what}")
    if len(differing) > FIRST_DIFFERENCES:
        lines.append(f"{name} differs at {len(differing) - FIRST_DIFFERENCES} more {series.keys_are}")
    return lines


def _counts(series: Series, count: int, truth: Side, recorded: Side, archived: Side | None) -> list[str]:
    """Trade counts against the 1d kline's, where a source falls short of it."""
    lines = []
    for name, side in (("REST", truth), ("recording", recorded), ("archive", archived)):
        if side is None:
            continue
        trades = sum(_trades(series, values) for values in side.values.values())
        if trades != count:
            lines.append(f"{name} covers {trades} trades, the 1d kline counts {count}")
    return lines


def _trades(series: Series, values: tuple[Any, ...]) -> int:
    """Trades one row stands for; an aggregate trade's values hold its first and last trade id."""
    return int(values[3]) - int(values[2]) + 1 if isinstance(series, AggTradeSeries) else 1


def _runs(keys: list[int], most: int = 3) -> str:
    """`1-5, 9, 12-14` for the first `most` runs of consecutive keys, then `...`."""
    runs: list[list[int]] = []
    for key in keys:
        if runs and key == runs[-1][1] + 1:
            runs[-1][1] = key
        else:
            runs.append([key, key])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (", ..." if len(runs) > most else "")


def save(engine: Engine, audit: Audit) -> None:
    """Replace the day's audit row: only the latest audit of a day is kept."""
    row = {**asdict(audit), "details": "\n".join(audit.details), "audited_at": now_ms()}
    key = (audits.c.symbol == audit.symbol) & (audits.c.kind == audit.kind) & (audits.c.day == audit.day)
    with engine.begin() as conn:
        conn.execute(delete(audits).where(key))
        conn.execute(audits.insert().values(row))


def audit_recorded_days(
    engine: Engine, rest: BinanceRest, archive: BinanceArchive, series: list[Series], days: list[date], renew: Any
) -> list[Audit]:
    """Audit each of `days` of each series that has recorded rows, no audit yet, and a
    file in the archive (one that has not appeared yet is tried again by a later run)."""
    done = []
    for one in series:
        for day in days:
            start = day_start_ms(day)
            if not recorded_day(engine, one, start, limit=1) or _audited(engine, one, day):
                continue
            if not archive.has(one, day):
                continue
            done.append(audit_day(engine, rest, archive, one.symbol, one.kind, day))
            renew()
    return done


def _audited(engine: Engine, series: Series, day: date) -> bool:
    key = (audits.c.symbol == series.symbol) & (audits.c.kind == series.kind) & (audits.c.day == day.isoformat())
    with engine.connect() as conn:
        return conn.execute(select(audits.c.verdict).where(key)).first() is not None


def audit_wanted_streams(settings: Settings, client: redis.Redis, engine: Engine) -> dict[str, Any]:
    """Beat's audit: the wanted trade and aggTrade streams' last AUDIT_LOOKBACK_DAYS
    closed days, one run at a time across all workers."""
    keys = RedisKeys(settings.redis_prefix)
    lock = Lease(client, keys.audit_lock, ttl_seconds=settings.rest_max_wait_seconds + 120.0, owner="audit")
    if not lock.acquire():
        return {"skipped": "another audit is running"}
    try:
        groups = GroupRegistry(client, keys).wanted().values()
        streams = [stream for group in groups for stream in group.streams]
        series = [one for one in series_of_streams(streams) if one.kind in AUDIT_KINDS]
        today = utc_day(now_ms())
        days = [today - timedelta(days=back) for back in range(settings.audit_lookback_days, 0, -1)]
        rest = BinanceRest.from_settings(settings, client)
        done = audit_recorded_days(engine, rest, BinanceArchive.from_settings(settings), series, days, lock.renew)
        return {"audited": [audit.summary() for audit in done]}
    finally:
        lock.release()


def latest_audits(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    """The most recent audits, newest first, for `status` (none in a database that
    no worker of this version has opened yet, which lacks the table)."""
    if not inspect(engine).has_table(audits.name):
        return []
    query = select(audits).order_by(audits.c.audited_at.desc()).limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]
