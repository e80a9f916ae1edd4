"""The fake's copy of Binance's public data archive (data.binance.vision), spot only.

Served at the archive's own paths, so the recorder reaches it by its base URL alone
(`BINANCE_ARCHIVE_URL=http://HOST:PORT`):

    /data/spot/daily/trades/BTCUSDT/BTCUSDT-trades-2026-12-04.zip
    /data/spot/daily/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-12-04.zip
    /data/spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2026-12-04.zip
    /data/spot/monthly/trades/BTCUSDT/BTCUSDT-trades-2026-11.zip
    ... and each of them + ".CHECKSUM" (`<sha256>  <name>.zip`, no final newline)

A file's rows are the market model's, the same trades REST serves, as CSV without a
header; times in microseconds from 2025-01-01 on, as Binance writes spot files. A
day exists once it has closed (and not before the genesis day); a month once all its
days have. Like the real archive, the fake is wrong on purpose on three days counted
back from the day it started (options `archive_missing_day`, `archive_bad_checksum_day`,
`archive_truncated_day`; 0 turns one off): one day has no files (404), one day's
CHECKSUM does not match its zip, and one day's files stop at 18:00 UTC (what #21 of
binance-public-data reported). A month's file is the concatenation of its days'
rows as published, holes included.

Files are built on request in a thread (a day at the default 10 trades a second is
864,000 rows per symbol: some seconds of work and tens of MB) and the last few are
kept; tests run the fake with a low `--trades-per-second` so that days stay small.
Zips are deterministic (fixed member times), so a checksum is the same in every run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from aiohttp import web

from fake_binance import intervals
from fake_binance.context import CONTEXT
from fake_binance.market import Market, UnknownSymbol, decimal_str

DAY_MS = 86_400_000
MICROSECONDS_FROM = date(2025, 1, 1)
"""Spot files' times are in microseconds from this day on, milliseconds before."""
TRUNCATED_AT_MS = 18 * 3_600_000
"""A truncated day's files hold the rows before 18:00 UTC only."""
DAILY_INTERVALS = tuple(i for i in intervals.INTERVALS if intervals.FIXED_MS.get(i, DAY_MS + 1) <= DAY_MS)
_CACHED_FILES = 32
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
_NAME = re.compile(r"(?P<symbol>[A-Z0-9]+)-(?P<kind>[A-Za-z0-9]+)-(?P<period>\d{4}-\d{2}(?:-\d{2})?)\.zip")


@dataclass(frozen=True)
class Defects:
    """The days on which the fake's archive is wrong (None: no such day)."""

    missing: date | None
    bad_checksum: date | None
    truncated: date | None

    @classmethod
    def counted_back(cls, today: date, missing: int, bad_checksum: int, truncated: int) -> Defects:
        def day(back: int) -> date | None:
            return today - timedelta(days=back) if back > 0 else None

        return cls(day(missing), day(bad_checksum), day(truncated))


DEFECTS = web.AppKey("archive_defects", Defects)


@dataclass(frozen=True)
class ArchiveFile:
    """One zip of the archive: what it holds (kind, symbol, kline interval) and its days."""

    kind: str  # trades, aggTrades, klines
    symbol: str
    interval: str | None
    first_day: date
    days: int

    @property
    def name(self) -> str:
        period = self.first_day.isoformat() if self.days == 1 else self.first_day.isoformat()[:7]
        return f"{self.symbol}-{self.interval or self.kind}-{period}"

    def day_list(self) -> list[date]:
        return [self.first_day + timedelta(days=k) for k in range(self.days)]


def parse_path(period: str, kind: str, symbol: str, tail: str) -> ArchiveFile | None:
    """The file a request path names, or None when it is not an archive path."""
    parts = tail.split("/")
    interval = parts[0] if kind == "klines" and len(parts) == 2 else None
    if kind not in ("trades", "aggTrades", "klines") or len(parts) != (2 if kind == "klines" else 1):
        return None
    match = _NAME.fullmatch(parts[-1])
    if not match or match["symbol"] != symbol or match["kind"] != (interval or kind):
        return None
    if interval is not None and interval not in (DAILY_INTERVALS if period == "daily" else intervals.INTERVALS):
        return None
    try:
        if period == "daily" and len(match["period"]) == 10:
            return ArchiveFile(kind, symbol, interval, date.fromisoformat(match["period"]), 1)
        if period == "monthly" and len(match["period"]) == 7:
            first = date.fromisoformat(match["period"] + "-01")
            following = (first + timedelta(days=31)).replace(day=1)
            return ArchiveFile(kind, symbol, interval, first, (following - first).days)
    except ValueError:
        return None
    return None


def _day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000


def published(market: Market, defects: Defects, file: ArchiveFile, now_ms: int) -> bool:
    """Whether the archive has the file yet: every day of it closed, after genesis,
    and (for a day's file) not the missing day."""
    genesis_day = datetime.fromtimestamp(market.clock.genesis_ms / 1000, tz=UTC).date()
    last_end = _day_ms(file.day_list()[-1]) + DAY_MS
    if file.first_day < genesis_day.replace(day=1) or last_end > now_ms:
        return False
    return file.days > 1 or (file.first_day >= genesis_day and file.first_day != defects.missing)


def _time(t_ms: int, day: date) -> int:
    return t_ms * 1000 if day >= MICROSECONDS_FROM else t_ms


def _end_ms(defects: Defects, day: date) -> int:
    """End (excluded) of the rows a day's file holds."""
    return _day_ms(day) + (TRUNCATED_AT_MS if day == defects.truncated else DAY_MS)


def _day_lines(market: Market, defects: Defects, file: ArchiveFile, day: date, now_ms: int) -> Iterator[str]:
    """The CSV lines of one day of `file`, as the archive publishes them."""
    if day == defects.missing:
        return
    index, start, end = market.index(file.symbol), _day_ms(day), _end_ms(defects, day)
    if file.kind == "klines":
        assert file.interval is not None
        open_ms = max(start, intervals.window_start(file.interval, market.clock.genesis_ms))
        while intervals.next_start(file.interval, open_ms) <= end:
            k = market.kline(index, file.interval, open_ms, now_ms)
            s = k.stats
            values = (s.open, s.high, s.low, s.close, s.volume)
            close_us = k.close_ms * 1000 + 999 if day >= MICROSECONDS_FROM else k.close_ms
            yield ",".join(
                [str(_time(k.open_ms, day)), *map(decimal_str, values), str(close_us),
                 decimal_str(s.quote_volume), str(s.count), decimal_str(s.taker_buy_volume),
                 decimal_str(s.taker_buy_quote_volume), "0"]
            )  # fmt: skip
            open_ms = intervals.next_start(file.interval, open_ms)
        return
    for n in range(market.clock.first_at_or_after(start), market.clock.last_at(end - 1) + 1):
        t = market.trade(index, n)
        price, qty, when, maker = decimal_str(t.price), decimal_str(t.qty), _time(t.time, day), t.buyer_is_maker
        if file.kind == "trades":
            yield f"{t.id},{price},{qty},{decimal_str(t.price * t.qty)},{when},{maker},True"
        else:
            yield f"{t.agg_id},{price},{qty},{t.id},{t.id},{when},{maker},True"


def build_zip(market: Market, defects: Defects, file: ArchiveFile, now_ms: int) -> tuple[bytes, str]:
    """(the zip's bytes, its CHECKSUM file's text)."""
    lines = (line for day in file.day_list() for line in _day_lines(market, defects, file, day, now_ms))
    csv = "".join(f"{line}\n" for line in lines).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo(f"{file.name}.csv", _ZIP_TIME), csv, zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    wrong = file.days == 1 and file.first_day == defects.bad_checksum
    digest = hashlib.sha256(data + b"re-uploaded" if wrong else data).hexdigest()
    return data, f"{digest}  {file.name}.zip"


async def serve_file(request: web.Request) -> web.StreamResponse:
    ctx, info = request.app[CONTEXT], request.match_info
    tail, checksum = info["tail"], info["tail"].endswith(".CHECKSUM")
    file = parse_path(info["period"], info["kind"], info["symbol"], tail.removesuffix(".CHECKSUM"))
    now = int(datetime.now(tz=UTC).timestamp() * 1000)
    try:
        ctx.market.index(info["symbol"])
    except UnknownSymbol:
        file = None
    if file is None or not published(ctx.market, request.app[DEFECTS], file, now):
        return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
    data, digest = await asyncio.get_running_loop().run_in_executor(
        None, _cached, ctx.market, request.app[DEFECTS], file
    )
    if checksum:
        return web.Response(body=digest.encode(), content_type="text/plain")
    return web.Response(body=data, content_type="application/zip")


@functools.lru_cache(maxsize=_CACHED_FILES)
def _cached(market: Market, defects: Defects, file: ArchiveFile) -> tuple[bytes, str]:
    """A published file never changes (its days are closed), so it is built once."""
    return build_zip(market, defects, file, _day_ms(file.day_list()[-1]) + DAY_MS)


ROUTES = [web.get(r"/data/spot/{period:daily|monthly}/{kind}/{symbol}/{tail:.+}", serve_file)]
