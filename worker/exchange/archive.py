"""Backfill in layers: whole UTC days from Binance's public data archive, the rest from REST.

The archive (data.binance.vision, `BINANCE_ARCHIVE_URL`) publishes each closed day of
a symbol's trades, aggregate trades and klines as a zip with a `.CHECKSUM` beside it:
two GETs of no request weight, where REST spends some 33,000 weight on one day of
BTCUSDT trades. But the archive lags (a day appears hours to days later) and is
sometimes wrong (missing days, truncated days, checksum mismatches): so each day is
taken from the archive when it has a file whose sha256 matches its CHECKSUM, and then
checked against what REST knows cheaply, the day's 1d kline trade count (weight 2).
What the archive lacks, a missing day, a refused zip, the hours a truncated day stops
short of, a day not closed yet, comes from REST page by page (`backfill.copy_pages`),
so the range ends with consecutive ids (kline open times on their grid).

Rows go through the drain's storage (insert-or-ignore; klines upsert), so running a
range again, or over rows the drain recorded, stores each row once. The engine only
reports: a `DayReport` per day (source and rows) to an `on_day` callback, which the
CLI prints and the Celery task puts in its PROGRESS meta for Flower.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import IO, Any

import redis
import requests
from sqlalchemy.engine import Engine

from worker import times
from worker.exchange.backfill import HistoryJob, _lock, copy_pages, run_history
from worker.exchange.history import (
    AggTradeSeries,
    KlineSeries,
    Row,
    Series,
    agg_trade_row,
    kline_row,
    series_for,
    trade_row,
)
from worker.exchange.rest import MAX_LIMIT, BinanceRest
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.store.storage import store_rows
from worker.streams import SPOT

DAY_MS = 86_400_000
MICROSECONDS_ABOVE = 10**13
"""Spot files give times in microseconds from 2025-01-01 on: a time above this is µs."""
LOAD_BATCH_ROWS = 20_000
"""Archive rows stored per transaction: a real day of BTCUSDT is over a million."""
DOWNLOAD_CHUNK_BYTES = 1 << 20
SPOOL_BYTES = 16 << 20
"""A zip up to this size stays in memory while it is checked; larger ones go to a temporary file."""
SOURCES = ("auto", "archive", "rest")

DayCallback = Callable[["DayReport"], None]


class ArchiveUnavailable(Exception):
    """The archive cannot give this file; the message says why (for the day's report)."""


def archive_path(series: Series, day: date, monthly: bool = False) -> str:
    """The path of `series`' file of `day` (of its month if `monthly`) under the archive's base URL."""
    if isinstance(series, KlineSeries):
        kind, folder, label = "klines", f"{series.symbol}/{series.interval}", series.interval
    else:
        kind = "aggTrades" if isinstance(series, AggTradeSeries) else "trades"
        folder, label = series.symbol, kind
    period, name = ("monthly", day.isoformat()[:7]) if monthly else ("daily", day.isoformat())
    return f"data/spot/{period}/{kind}/{folder}/{series.symbol}-{label}-{name}.zip"


class BinanceArchive:
    """A client of the archive: downloads a day's zip, checks it against its CHECKSUM,
    and reads its CSV as rows of our tables."""

    def __init__(self, base_url: str, timeout: float, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> BinanceArchive:
        return cls(settings.binance_archive_url, settings.rest_timeout_seconds)

    def rows(self, series: Series, day: date, monthly: bool = False) -> Iterator[list[Row]]:
        """The rows of the day's (or its month's) file in batches, from a zip whose
        sha256 matched its CHECKSUM.

        Downloads and checks the file before returning, so that ArchiveUnavailable (no
        such file, a checksum that does not match, an unreadable zip) comes from this
        call; the rows are read as they are consumed.
        """
        path = archive_path(series, day, monthly)
        expected = self._checksum(path)
        spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115  (the reader of the rows closes it)
        try:
            actual = self._download(path, spool)
            if actual != expected:
                raise ArchiveUnavailable(f"checksum mismatch (CHECKSUM {expected[:12]}..., zip {actual[:12]}...)")
            archive = zipfile.ZipFile(spool)
            member = archive.open(archive.namelist()[0])
        except (zipfile.BadZipFile, IndexError) as error:
            spool.close()
            raise ArchiveUnavailable(f"unreadable zip: {error}") from None
        except BaseException:
            spool.close()
            raise
        return _read(series, spool, archive, member)

    def has(self, series: Series, day: date) -> bool:
        """Whether the archive has published the day's file yet (its CHECKSUM is there)."""
        try:
            self._get(f"{archive_path(series, day)}.CHECKSUM").close()
        except ArchiveUnavailable:
            return False
        return True

    def _checksum(self, path: str) -> str:
        response = self._get(f"{path}.CHECKSUM")
        digest = response.text.split(maxsplit=1)[0].lower() if response.text.strip() else ""
        if len(digest) != 64:
            raise ArchiveUnavailable(f"its CHECKSUM is not a sha256 line: {response.text[:80]!r}")
        return digest

    def _download(self, path: str, into: IO[bytes]) -> str:
        """Write the file to `into`, returning its sha256."""
        digest = hashlib.sha256()
        with self._get(path, stream=True) as response:
            for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
                digest.update(chunk)
                into.write(chunk)
        into.seek(0)
        return digest.hexdigest()

    def _get(self, path: str, stream: bool = False) -> requests.Response:
        url = f"{self.base_url}/{path}"
        try:
            response = self.session.get(url, timeout=self.timeout, stream=stream)
        except requests.RequestException as error:
            raise ArchiveUnavailable(f"archive unreachable ({type(error).__name__})") from None
        if response.status_code == 404:
            raise ArchiveUnavailable("not in the archive")
        if not response.ok:
            raise ArchiveUnavailable(f"archive answered HTTP {response.status_code}")
        return response


def _read(series: Series, spool: IO[bytes], archive: zipfile.ZipFile, member: IO[bytes]) -> Iterator[list[Row]]:
    with spool, archive, member:
        yield from _batches(parse_rows(series, io.TextIOWrapper(member, "ascii")), LOAD_BATCH_ROWS)


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def parse_rows(series: Series, lines: IO[str]) -> Iterator[Row]:
    """The rows of an archive CSV. A header row (futures files gained one part way,
    spot files may) is recognised by its first field not being a number and skipped."""
    for number, fields in enumerate(csv.reader(lines)):
        if not fields or (number == 0 and not fields[0].strip().isdigit()):
            continue
        yield archive_row(series, fields)


def _ms(value: str) -> int:
    """A file's time as our milliseconds (spot files use µs since 2025-01-01)."""
    t = int(value)
    return t // 1000 if t > MICROSECONDS_ABOVE else t


def _flag(value: str) -> bool:
    return value.strip().lower() == "true"  # spot files say True/False, futures true/false


def archive_row(series: Series, f: list[str]) -> Row:
    """One CSV record as a table row, through the same builders as REST's rows."""
    if isinstance(series, KlineSeries):
        close_time = _ms(f[6])
        kline = [_ms(f[0]), f[1], f[2], f[3], f[4], f[5], close_time, f[7], int(f[8]), f[9], f[10], f[11]]
        return kline_row(series.symbol, series.interval, kline, close_time + 1)  # archived klines are closed
    if isinstance(series, AggTradeSeries):
        agg = {"a": int(f[0]), "p": f[1], "q": f[2], "f": int(f[3]), "l": int(f[4]), "T": _ms(f[5]), "m": _flag(f[6])}
        return agg_trade_row(series.symbol, agg)  # type: ignore[arg-type]  # (no best-match flag: futures lack it)
    trade = {"id": int(f[0]), "price": f[1], "qty": f[2], "time": _ms(f[4]), "isBuyerMaker": _flag(f[5])}
    return trade_row(series.symbol, trade)  # type: ignore[arg-type]


# -- the layered backfill ------------------------------------------------------------------


@dataclass
class DayReport:
    """What one UTC day of a backfill took from where."""

    day: str
    source: str  # archive, rest, archive+rest, none
    archive_rows: int = 0
    rest_rows: int = 0
    note: str = ""  # why REST was needed, or why nothing could be had

    @property
    def rows(self) -> int:
        return self.archive_rows + self.rest_rows

    def line(self) -> str:
        """`2026-12-05  archive+rest       4320 rows = 3240 + 1080  (archive: 3240 of 4320 trade ids, ...)`"""
        split = f" = {self.archive_rows} + {self.rest_rows}" if self.archive_rows and self.rest_rows else ""
        return f"{self.day}  {self.source:<12} {self.rows:>9} rows{split}" + (f"  ({self.note})" if self.note else "")


@dataclass(frozen=True)
class _Window:
    """The part [low, high) of the UTC day starting at `day_start` that a backfill wants."""

    day_start: int
    low: int
    high: int

    @property
    def whole(self) -> bool:
        return (self.low, self.high) == (self.day_start, self.day_start + DAY_MS)


class _MonthReader:
    """A monthly file's batches handed out day by day: the file lists its days in
    order, so each day's rows are read once, as that day is backfilled."""

    def __init__(self, series: Series, batches: Iterator[list[Row]]) -> None:
        self.series = series
        self.batches = batches
        self.pending: list[Row] = []

    def day(self, day_start: int) -> Iterator[list[Row]]:
        """The batches of the day starting at `day_start` (earlier rows are skipped)."""
        when, end = self.series.time_index, day_start + DAY_MS
        while True:
            if not self.pending:
                self.pending = next(self.batches, [])
                if not self.pending:
                    return
            rows = [row for row in self.pending if day_start <= row[when] < end]
            self.pending = [row for row in self.pending if row[when] >= end]
            if rows:
                yield rows
            if self.pending:
                return


@dataclass
class _Loaded:
    """The keys of the archive rows stored for a day, and how many trades they cover."""

    keys: list[int]
    trades: int = 0


class LayeredBackfill:
    """Fills [start, end) of one series day by day: the archive first, REST for the rest."""

    def __init__(self, engine: Engine, rest: BinanceRest, archive: BinanceArchive, page_limit: int = MAX_LIMIT) -> None:
        self.engine = engine
        self.rest = rest
        self.archive = archive
        self.page_limit = page_limit
        self.months: dict[date, _MonthReader | None] = {}  # None: the month's file is unusable

    def run(
        self, series: Series, start: int, end: int, source: str, on_day: DayCallback = lambda _: None
    ) -> list[DayReport]:
        """Every day of [start, end), in order; `source` is auto, archive (no REST) or rest."""
        reports, cursor = [], None
        now = self.rest.server_time_ms() if source != "archive" else times.now_ms()
        for day_start in range(start - start % DAY_MS, end, DAY_MS):
            window = _Window(day_start, max(start, day_start), min(end, day_start + DAY_MS))
            report = DayReport(utc_day(day_start).isoformat(), "none")
            loaded = None
            if source != "rest" and day_start + DAY_MS > now:
                report.note = "day not closed yet"
            elif source != "rest":
                loaded = self._from_archive(series, window, self._month(series, window, start, min(end, now)), report)
            if source != "archive":
                cursor = self._from_rest(series, window, cursor, loaded, report)
            report.source = "+".join(name for name, rows in (("archive", loaded), ("rest", report.rest_rows)) if rows)
            report.source = report.source or "none"
            reports.append(report)
            on_day(report)
        return reports

    def _month(self, series: Series, window: _Window, start: int, end: int) -> _MonthReader | None:
        """The reader of the window's month when the range wants that whole month, which
        has closed, and its monthly file is usable (one download instead of ~30)."""
        month = utc_day(window.day_start).replace(day=1)
        following = (month + timedelta(days=31)).replace(day=1)
        if not start <= day_start_ms(month) < day_start_ms(following) <= end:
            return None
        if month not in self.months:
            try:
                self.months[month] = _MonthReader(series, self.archive.rows(series, month, monthly=True))
            except ArchiveUnavailable:
                self.months[month] = None  # its days' own files are tried instead
        return self.months[month]

    def _from_archive(
        self, series: Series, window: _Window, month: _MonthReader | None, report: DayReport
    ) -> _Loaded | None:
        """Store the archive's rows of the window (from the month's file, when given);
        None when it has no usable file."""
        loaded = _Loaded([])
        try:
            day = month.day(window.day_start) if month else self.archive.rows(series, utc_day(window.day_start))
            for batch in day:
                rows = [row for row in batch if window.low <= row[series.time_index] < window.high]
                with self.engine.begin() as conn:
                    store_rows(conn, {series.table_name: rows})
                loaded.keys.extend(row[series.key_index] for row in rows)
                loaded.trades += sum(_trades_in(series, row) for row in rows)
        except ArchiveUnavailable as error:
            report.note = f"archive: {error}"
            return None
        report.archive_rows = len(loaded.keys)
        report.note = "from the month's file" if month else ""
        return loaded

    def _from_rest(
        self, series: Series, window: _Window, cursor: int | None, loaded: _Loaded | None, report: DayReport
    ) -> int | None:
        """Fetch from REST whatever of the window the archive did not give; returns the
        key the next day starts at (None: not known)."""
        first = first_key(self.rest, series, window.low, window.high) if cursor is None else cursor
        if first is None:
            return None
        keys = sorted({k for k in (loaded.keys if loaded else []) if k >= first})
        last = self._last_key(series, window, first, keys, loaded)
        next_key = keys[-1] + series.step if keys else first
        for hole_first, hole_last in _holes(keys, first, last, series.step):
            for page in copy_pages(
                self.engine, self.rest, series, hole_first, hole_last, window.high, page_limit=self.page_limit
            ):
                report.rest_rows += page.rows
                next_key = max(next_key, page.cursor)
        if loaded is not None and report.rest_rows:
            report.note = f"archive lacked {report.rest_rows} of the {series.keys_are}: taken from REST"
        return last + series.step if last is not None else next_key

    def _last_key(
        self, series: Series, window: _Window, first: int, keys: list[int], loaded: _Loaded | None
    ) -> int | None:
        """The window's last key when it can be known without paging (None: by time).

        Klines: their grid. A whole day of trades: first + the 1d kline's trade count - 1.
        A whole day of aggregate trades: the archive's last one, when the trades they
        cover add up to that count.
        """
        if isinstance(series, KlineSeries):
            return window.high - 1 - (window.high - 1 - first) % series.step
        if not window.whole:
            return None
        count = day_trade_count(self.rest, series.symbol, window.day_start)
        if isinstance(series, AggTradeSeries):
            return keys[-1] if loaded is not None and keys and loaded.trades == count else None
        return first + count - 1


def first_key(rest: BinanceRest, series: Series, low: int, high: int) -> int | None:
    """The first key of `series` in [low, high) by REST: klines their grid, ids by
    aggTrades' time search (an aggregate trade names its first trade id)."""
    if isinstance(series, KlineSeries):
        first = low + (-low) % series.step
        return first if first < high else None
    found = AggTradeSeries(series.symbol).keys_between(rest, low, high)[0]
    if found is None or isinstance(series, AggTradeSeries):
        return found
    return int(rest.agg_trades(series.symbol, from_id=found, limit=1)[0]["f"])


def day_trade_count(rest: BinanceRest, symbol: str, day_start: int) -> int:
    """How many trades the UTC day starting at `day_start` had: its 1d kline's count (weight 2)."""
    return int(rest.klines(symbol, "1d", start_ms=day_start, end_ms=day_start, limit=1)[0][8])


def day_start_ms(day: date) -> int:
    return int(datetime.combine(day, time(), UTC).timestamp() * 1000)


def closed_day(text: str, now_ms: int | None = None) -> date:
    """The UTC day a user names (`2026-12-05`, `-1d`, any time in it), refused unless it has closed."""
    now = times.now_ms() if now_ms is None else now_ms
    day = utc_day(times.parse_time(text, now))
    if day_start_ms(day) + DAY_MS > now:
        raise ValueError(f"the UTC day {day} has not closed yet: audit a day before {utc_day(now)}")
    return day


def _trades_in(series: Series, row: Row) -> int:
    """How many trades one row stands for (an aggregate trade covers first..last)."""
    if isinstance(series, AggTradeSeries):
        return int(row[5]) - int(row[4]) + 1
    return 1


def _holes(keys: list[int], first: int, last: int | None, step: int) -> list[tuple[int, int | None]]:
    """The runs of keys from `first` to `last` that `keys` (sorted) lacks; with `last`
    None the run after the last key is open-ended (REST stops it by time)."""
    runs: list[tuple[int, int | None]] = []
    expected = first
    for key in keys:
        if key > expected:
            runs.append((expected, key - step))
        expected = max(expected, key + step)
    if last is None:
        runs.append((expected, None))
    elif expected <= last:
        runs.append((expected, last))
    return runs


def utc_day(t_ms: int) -> date:
    """The UTC day of a time (ms)."""
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC).date()


def run_backfill(
    settings: Settings,
    client: redis.Redis,
    engine: Engine,
    job: HistoryJob,
    source: str,
    progress: Callable[[int, int, int], None] = lambda *_: None,
    on_day: DayCallback = lambda _: None,
) -> dict[str, Any]:
    """A history range by `source`: `rest` is REST's resumable job (`run_history`);
    `auto` and `archive` the layered backfill, under the same lock. Klines longer than a
    day (3d, 1w) have no daily files, so `auto` takes them from REST too."""
    series = series_for(job.symbol, job.kind, job.market)
    if source == "rest" or job.market != SPOT or (source == "auto" and series.step > DAY_MS):
        return run_history(settings, client, engine, job, progress)
    keys = RedisKeys(settings.redis_prefix)
    lock = _lock(settings, client, keys.backfill_job_lock(job.name), "history")
    if not lock.acquire():
        return {"skipped": f"a backfill of {job.name} is already running"}
    total, rows = job.end - job.start, [0]

    def day_done(report: DayReport) -> None:
        lock.renew()
        on_day(report)
        rows[0] += report.rows
        day_end = day_start_ms(date.fromisoformat(report.day)) + DAY_MS
        progress(min(total, day_end - job.start), total, rows[0])

    try:
        rest = BinanceRest.from_settings(settings, client)
        backfill = LayeredBackfill(engine, rest, BinanceArchive.from_settings(settings))
        days = backfill.run(series, job.start, job.end, source, day_done)
    finally:
        lock.release()
    return {
        **asdict(job),
        "source": source,
        "rows": sum(d.rows for d in days),
        "archive_rows": sum(d.archive_rows for d in days),
        "rest_rows": sum(d.rest_rows for d in days),
        "days": [asdict(d) for d in days],
    }


def checked_job(symbol: Any, kind: Any, start: Any, end: Any, source: Any, market: Any = SPOT) -> HistoryJob:
    """The job of a backfill by `source`, or ValueError saying what is wrong: REST alone
    cannot find trades by time, the layered backfill can (the archive's days, and
    aggTrades' first trade id for the rest). The archive read here is spot's: a futures
    market's `auto` is REST."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    if market != SPOT and source == "archive":
        raise ValueError(f"the archive backfill reads spot's files only: backfill {market} with --source rest")
    job = HistoryJob.checked(symbol, kind, start, end, market, by_time=source == "rest" or market != SPOT)
    if source == "archive" and series_for(job.symbol, job.kind).step > DAY_MS:
        raise ValueError(f"the archive has no daily files of {job.kind} (only up to kline_1d): use --source rest")
    return job
