"""The data commands of `binance-recorder`: backfill history, export rows, draw a chart,
rebuild an order book, replay a window as Binance, archive closed days to day files.

They work on the database and Binance's REST API directly, so they need Redis (for the
shared REST weight budget) and the database, but no running worker — except
`backfill --worker`, which hands the job to one and shows its progress (as Flower does),
and `archive`, which runs the archiver's task on a worker: its lock keeps it from
writing the files the beat's run is writing.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from worker.exchange.archive import SOURCES, DayReport
from worker.ops.clients import call_task, client_app, existing_database, redis_client
from worker.ops.report import ProgressBar

if TYPE_CHECKING:
    from worker.ops.book import Book

POLL_SECONDS = 0.5


def add_data_commands(commands: Any) -> None:
    """Register backfill, audit, export, chart and book on the CLI's sub-command parser."""
    _add_backfill(commands)
    _add_audit(commands)
    _add_export(commands)
    _add_chart(commands)
    _add_book(commands)
    _add_replay(commands)
    _add_archive(commands)


def _time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--start",
        default="-1d",
        help="ISO time (UTC unless a zone is given), ms since the epoch, 'now' or "
        "relative like -2h, -30m, -7d (default: %(default)s)",
    )
    parser.add_argument("--end", default="now", help="same forms; excluded (default: %(default)s)")


def _market_option(parser: argparse.ArgumentParser) -> None:
    from worker.streams import MARKETS, SPOT

    parser.add_argument(
        "--market", choices=list(MARKETS), default=SPOT, help="spot, or the futures usdm / coinm (default: spot)"
    )


def _parsed_range(args: argparse.Namespace) -> tuple[int, int]:
    from worker.times import check_range, parse_time

    now = int(time.time() * 1000)
    start, end = parse_time(args.start, now), parse_time(args.end, now)
    check_range(start, end)
    return start, end


# -- backfill ---------------------------------------------------------------------------


def _add_backfill(commands: Any) -> None:
    parser = commands.add_parser(
        "backfill",
        help="fetch a symbol's trades, aggregate trades or klines for a time range (archive, then REST)",
        description="Fetch history into the database. --source auto (default) takes each closed UTC day "
        "from Binance's public data archive (BINANCE_ARCHIVE_URL; zips checked against their CHECKSUM) and "
        "whatever the archive lacks (days not published yet, missing, refused or truncated days) from the REST "
        "API, within the shared request-weight budget; one line per day says which. --source rest is REST "
        "alone, resumable (running the same range again continues where it stopped); --source archive the "
        "archive alone.",
    )
    parser.add_argument("symbol", help="e.g. BTCUSDT")
    parser.add_argument(
        "kind", help="trade, aggTrade or kline_<interval> (e.g. kline_1m, kline_1h); futures also fundingRate"
    )
    _time_range(parser)
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="where rows come from: auto = spot's public data archive for closed days, REST for the rest "
        "(a futures market's auto is REST) (default: auto)",
    )
    _market_option(parser)
    parser.add_argument(
        "--worker", action="store_true", help="run it on a Celery worker (progress also in Flower) instead of here"
    )
    parser.set_defaults(func=cmd_backfill)


def cmd_backfill(args: argparse.Namespace) -> int:
    from worker.exchange.archive import checked_job, run_backfill
    from worker.store.storage import create_schema, make_engine

    start, end = _parsed_range(args)
    job = checked_job(args.symbol, args.kind, start, end, args.source, args.market)
    bar = ProgressBar(f"{job.symbol} {job.kind}", sys.stderr)

    def progress(done: int, total: int, rows: int) -> None:
        bar.update(done, total, f"{rows} rows")

    def day_line(report: Any) -> None:
        print(report.line(), flush=True)

    if args.worker:
        result = _backfill_on_worker(args.settings.redis_url, job, args.source, progress)
        for report in result.get("days", []):
            day_line(DayReport(**report))
    else:
        settings = args.settings
        database = make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
        create_schema(database)
        result = run_backfill(settings, redis_client(settings), database, job, args.source, progress, day_line)
    bar.finish()
    if "skipped" in result:
        print(f"not started: {result['skipped']}", file=sys.stderr)
        return 1
    print(_describe({key: value for key, value in result.items() if key != "days"}))
    return 0


def _backfill_on_worker(redis_url: str, job: Any, source: str, progress: Any) -> dict[str, Any]:
    kwargs = {"symbol": job.symbol, "kind": job.kind, "start": job.start, "end": job.end, "source": source}
    result = client_app(redis_url).send_task("tasks.backfill", kwargs={**kwargs, "market": job.market})
    print(f"task {result.id} sent; waiting for a worker ...", file=sys.stderr)
    while not result.ready():
        # One read of state and meta together: read apart, the task may finish between
        # them, and the finished task's result has no "done".
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] == "PROGRESS":
            progress(meta["result"]["done"], meta["result"]["total"], meta["result"]["rows"])
        time.sleep(POLL_SECONDS)
    return result.get()


# -- audit ------------------------------------------------------------------------------


def _add_audit(commands: Any) -> None:
    parser = commands.add_parser(
        "audit",
        help="compare a recorded day with Binance's public data archive and REST",
        description="Compare one closed UTC day of recorded trades (and/or aggregate trades) with the "
        "archive's file and with REST, id by id: ids missing on each side, repeated ids, differing price, "
        "quantity, time or flags, counts against the day's 1d kline. REST decides where they disagree. "
        "The verdict goes to the audits table (`status` shows the latest). Exit 0 verified or only the "
        "archive missing, 1 something differs or the recording lacks rows (the first differences are "
        "printed), 2 bad input.",
    )
    parser.add_argument("symbol", help="e.g. BTCUSDT")
    parser.add_argument("--day", required=True, help="the UTC day: 2026-12-05, or relative like -1d (yesterday)")
    parser.add_argument("--kinds", default="trade,aggTrade", help="comma-separated: trade, aggTrade (default: both)")
    parser.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from worker.exchange.archive import BinanceArchive, closed_day
    from worker.exchange.audit import AUDIT_KINDS, DIFFERS, RECORDING_INCOMPLETE, audit_day
    from worker.exchange.rest import BinanceRest
    from worker.groups import SYMBOL_PATTERN
    from worker.settings import split_list
    from worker.store.storage import create_schema

    settings = args.settings
    symbol = args.symbol.strip().upper()
    if not SYMBOL_PATTERN.match(symbol):
        raise ValueError(f"{args.symbol!r} is not a Binance symbol: use one such as 'BTCUSDT'")
    kinds = split_list(args.kinds)
    if not kinds or any(kind not in AUDIT_KINDS for kind in kinds):
        raise ValueError(f"--kinds {args.kinds!r}: use a comma-separated list of {', '.join(AUDIT_KINDS)}")
    day = closed_day(args.day)
    engine = existing_database(settings)
    create_schema(engine)
    rest = BinanceRest.from_settings(settings, redis_client(settings))
    archive = BinanceArchive.from_settings(settings)
    code = 0
    for kind in kinds:
        audit = audit_day(engine, rest, archive, symbol, kind, day)
        print(audit.summary())
        for line in audit.details:
            print(f"  {line}")
        code = max(code, 1 if audit.verdict in (DIFFERS, RECORDING_INCOMPLETE) else 0)
    return code


def _describe(result: dict[str, Any]) -> str:
    return "  ".join(f"{key}={value}" for key, value in result.items())


# -- export -----------------------------------------------------------------------------


def _add_export(commands: Any) -> None:
    parser = commands.add_parser(
        "export",
        help="write a symbol's rows of one kind and time range to CSV or Parquet",
        description="Stream rows from the database to a file, ordered by time, without holding them in memory.",
    )
    parser.add_argument("symbol", help="e.g. BTCUSDT")
    parser.add_argument(
        "kind",
        help="trade, aggTrade, kline_<interval>, ticker, miniTicker, bookTicker, avgPrice, depth, ... "
        "(or a table name); futures also markPrice, forceOrder (liquidations: at most one per symbol per "
        "second, a sample by Binance's design), openInterest, fundingRate; `book` writes the rebuilt order "
        "book every --step",
    )
    _time_range(parser)
    _market_option(parser)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv", help="(default: %(default)s)")
    parser.add_argument("-o", "--output", help="file to write (default: SYMBOL-KIND.FORMAT here)")
    parser.add_argument("--step", default="1s", help="book only: time between rows, e.g. 100ms, 1s, 1m (default: 1s)")
    parser.add_argument("--levels", type=int, default=10, help="book only: levels per side (default: 10)")
    parser.set_defaults(func=cmd_export)


def _database_and_range(args: argparse.Namespace) -> tuple[Engine, int, int]:
    engine = existing_database(args.settings)
    start, end = _parsed_range(args)
    return engine, start, end


def cmd_export(args: argparse.Namespace) -> int:
    from worker.ops.export import export_rows, resolve_source

    engine, start, end = _database_and_range(args)
    path = Path(args.output or f"{args.symbol.upper()}-{args.kind}.{args.format}")

    def progress(rows: int) -> None:
        print(f"\r{rows} rows written", end="", file=sys.stderr, flush=True)

    if args.kind.lower() == "book":
        return _export_book(args, engine, start, end, path, progress)
    rows = export_rows(
        engine,
        args.kind,
        args.symbol,
        start,
        end,
        path,
        fmt=args.format,
        progress=progress,
        archive_dir=args.settings.archive_path,
        market=args.market,
    )
    print(file=sys.stderr)
    lossy = resolve_source(args.kind, market=args.market).lossy
    print(f"{rows} rows -> {path}" + (f" ({lossy})" if lossy else ""))
    return 0


def _export_book(args: argparse.Namespace, engine: Engine, start: int, end: int, path: Path, progress: Any) -> int:
    from worker.ops.book import BookUnknown
    from worker.ops.book_export import export_book
    from worker.times import parse_duration_ms

    step = parse_duration_ms(args.step)
    try:
        archive = args.settings.archive_path
        rows = export_book(
            engine, args.symbol, start, end, step, args.levels, path, args.format, progress, archive, args.market
        )
    except BookUnknown as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    print(f"{rows} books -> {path}")
    return 0


# -- book -------------------------------------------------------------------------------


def _add_book(commands: Any) -> None:
    parser = commands.add_parser(
        "book",
        help="rebuild a symbol's order book at a past instant from the recorded depth",
        description="Rebuild the order book from the stored snapshot and diff-depth updates. Exit 0 with "
        "the book; 1 when the instant is before the first snapshot or inside a gap (the message says "
        "where the nearest known books are); 2 bad input.",
    )
    parser.add_argument("symbol", help="e.g. BTCUSDT")
    parser.add_argument(
        "--at",
        required=True,
        help="ISO time (UTC unless a zone is given), ms since the epoch, 'now' or relative like -10s, -2h",
    )
    parser.add_argument("--levels", type=int, default=20, help="levels per side; 0 for all (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help='print {"symbol", "update_id", "time", "bids", "asks"}')
    _market_option(parser)
    parser.set_defaults(func=cmd_book)


def cmd_book(args: argparse.Namespace) -> int:
    import json

    from worker.ops.book import BookUnknown, book_at
    from worker.times import parse_time

    if args.levels < 0:
        raise ValueError(f"--levels {args.levels}: give a number of levels per side, or 0 for all")
    at = parse_time(args.at)
    engine = existing_database(args.settings)
    try:
        book = book_at(
            engine, args.symbol, at, args.levels or None, archive_dir=args.settings.archive_path, market=args.market
        )
    except BookUnknown as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(book.as_json()) if args.json else _book_text(book))
    return 0


def _book_text(book: Book) -> str:
    """The book as a person reads it: best levels on top, bids left, asks right."""
    from worker.times import iso_ms

    lines = [
        f"{book.symbol} at {iso_ms(book.time)}, update id {book.update_id}",
        f"{'bid qty':>16} {'bid':>16} | {'ask':<16} {'ask qty':<16}",
    ]
    for index in range(max(len(book.bids), len(book.asks))):
        bid = book.bids[index] if index < len(book.bids) else ("", "")
        ask = book.asks[index] if index < len(book.asks) else ("", "")
        lines.append(f"{bid[1]:>16} {bid[0]:>16} | {ask[0]:<16} {ask[1]:<16}")
    return "\n".join(lines)


# -- chart ------------------------------------------------------------------------------


def _add_chart(commands: Any) -> None:
    parser = commands.add_parser(
        "chart",
        help="draw a PNG of price and volume for a symbol and time range",
        description="Price on top, volume below; candles from klines when recorded, else the trade (or "
        "aggregate trade) price. --market usdm / coinm charts a futures contract from its market's tables.",
    )
    parser.add_argument("symbol", help="e.g. BTCUSDT")
    _time_range(parser)
    parser.add_argument("--interval", help="kline interval to prefer (default: the finest recorded)")
    parser.add_argument("--size", default="1200x700", help="WIDTHxHEIGHT in pixels (default: %(default)s)")
    parser.add_argument("-o", "--output", help="PNG to write (default: SYMBOL.png here)")
    _market_option(parser)
    parser.set_defaults(func=cmd_chart)


def cmd_chart(args: argparse.Namespace) -> int:
    from worker.ops.chart import draw_chart

    engine, start, end = _database_and_range(args)
    width, height = _size(args.size)
    path = Path(args.output or f"{args.symbol.upper()}.png")
    summary = draw_chart(
        engine,
        args.symbol,
        start,
        end,
        path,
        width_px=width,
        height_px=height,
        interval=args.interval,
        market=args.market,
    )
    print(summary.describe(width, height))
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 1200x700") from None
    return width, height


# -- replay -----------------------------------------------------------------------------


def _add_replay(commands: Any) -> None:
    parser = commands.add_parser(
        "replay",
        help="serve a recorded window as Binance's websocket and REST API, for backtests",
        description="Serve the frames recorded in [--start, --end) as Binance's websocket streams and its "
        "market-data REST API, at the replay's clock: point a Binance client's base URLs at the two URLs of "
        "the first line. The clock stands at --start until the first subscription. Runs until Ctrl-C.",
    )
    _time_range(parser)
    parser.add_argument(
        "--speed", default="1", help="1 = real time, 10 = ten times faster, max = as fast as clients read (default: 1)"
    )
    parser.add_argument("--symbols", default="", help="comma-separated symbols (default: all recorded in the window)")
    parser.add_argument(
        "--streams", default="", help="comma-separated stream kinds, e.g. trade,depth@100ms (default: all recorded)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9443, help="port to listen on; 0 for any free one (default: 9443)")
    parser.add_argument(
        "--certfile",
        help="a TLS certificate (PEM): serve wss:// and https:// (cryptofeed takes only wss:// URLs); with --keyfile",
    )
    parser.add_argument("--keyfile", help="the certificate's private key (PEM), for --certfile")
    parser.add_argument(
        "--gaps",
        choices=["close", "continue"],
        default="close",
        help="at a recorded gap, close the connections that carry it as Binance's disconnect would, "
        "or send on (default: close)",
    )
    parser.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from worker.replay.server import serve
    from worker.replay.session import ReplayWindow, Session
    from worker.settings import split_list

    engine, start, end = _database_and_range(args)
    window = ReplayWindow(
        engine,
        start,
        end,
        [symbol.upper() for symbol in split_list(args.symbols)] or None,
        split_list(args.streams) or None,
        _speed(args.speed),
        close_on_gaps=args.gaps == "close",
    )
    _check_recorded(window)
    tls = _tls_context(args.certfile, args.keyfile)

    def say(line: str) -> None:
        print(line, flush=True)

    async def replay() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await serve(Session(window), args.host, args.port, say, stop, tls)

    asyncio.run(replay())
    say("replay stopped")
    return 0


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server TLS context of the certificate and its key, or None (plain ws:// and http://)."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ValueError("--certfile and --keyfile go together: give both, or neither for ws:// and http://")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use --certfile {certfile} with --keyfile {keyfile}: {error}") from None
    return context


def _speed(text: str) -> float | None:
    if text.strip().lower() == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = 0.0
    if not 0 < speed < float("inf"):
        raise ValueError(f"--speed {text!r}: give a positive number (1 = real time, 10 = ten times faster) or max")
    return speed


def _check_recorded(window: Any) -> None:
    """One line and exit 2 for a window with nothing to replay: an unknown symbol, a
    stream kind never recorded in it (ValueError from `events`, raised at the call)."""
    from worker.replay.events import events

    kinds = window.streams or [None]
    for kind in kinds:
        found = events(window.engine, window.start_ms, window.end_ms, window.symbols, None if kind is None else [kind])
        if next(iter(found), None) is None:
            what = f"{kind} frames" if kind else "frames"
            raise ValueError(
                f"no {what} were recorded in the window: check --start, --end"
                f"{' and --streams' if kind else ''} (binance-recorder status lists what is recorded)"
            )


# -- archive ----------------------------------------------------------------------------


def _add_archive(commands: Any) -> None:
    parser = commands.add_parser(
        "archive",
        help="write the closed UTC days to day files (Parquet) now, as beat does every ARCHIVE_INTERVAL_SECONDS",
        description="Run the archiver's task on a worker and wait for it: every closed day of every table "
        "that is not in ARCHIVE_DIR yet, or has changed since, is written there. Exit 0 when it ran, "
        "1 when another run holds the lock.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the worker's answer; a longer run goes on after (default: %(default)s)",
    )
    parser.set_defaults(func=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    result = call_task(args.settings.redis_url, "tasks.archive_days", [], args.timeout)
    if "skipped" in result:
        print(f"not started: {result['skipped']}", file=sys.stderr)
        return 1
    archive = args.settings.archive_path
    for path, rows in result["written"].items():
        print(f"{rows:>10} rows  {archive / path}")
    refused = (
        f"; refused (changed while written, next run): {', '.join(result['refused'])}" if result["refused"] else ""
    )
    print(
        f"{len(result['written'])} files, {result['bytes']} bytes; {result['unchanged_days']} days unchanged; "
        f"{result['seconds']} s{refused}"
    )
    return 0
