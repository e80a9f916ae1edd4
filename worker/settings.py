"""All configuration, read once from environment variables into one typed object.

Every setting has a working default so that `celery -A worker worker` runs with no
configuration at all; the settings table of docs/settings.md is checked against this file by a
test, so a setting cannot be added without being documented.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.streams import COINM, SPOT, USDM


def _setting(default: Any, doc: str, low: float | None = None, high: float | None = None) -> Any:
    """A setting with its documentation and, for numbers, the inclusive range it must be in."""
    return field(default=default, metadata={"doc": doc, "range": (low, high)})


def _base_url(default: str, of: str, appended: str) -> Any:
    """A base URL of Binance's: the code appends the paths, so a fake exchange is a matter of URLs."""
    return _setting(default, f"Base URL of Binance's {of}; {appended} is appended.")


# A positive interval or timeout: zero or less would busy-loop or never wait.
_POSITIVE = 0.001
# What SQLAlchemy URLs the storage layer supports (worker/store/storage.py).
SUPPORTED_DATABASES = ("sqlite", "postgresql")


RENAMED = {"LISTING_CHECK_INTERVAL_SECONDS": "LISTING_REFRESH_SECONDS"}
"""Old name -> the setting that replaced it: an old name still works while the new one is unset."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration. Field `foo_bar` is read from env var `FOO_BAR`."""

    redis_url: str = _setting("redis://localhost:6379/0", "Redis for the Celery broker, results, buffers and state.")
    database_url: str = _setting(
        "sqlite:///data/binance.db",
        "SQLAlchemy URL of the database (a SQLite file under ./data/ by default; postgresql+psycopg://... works too).",
    )
    binance_ws_url: str = _base_url("wss://data-stream.binance.vision", "websocket streams", "/stream?streams=...")
    binance_rest_url: str = _base_url("https://api.binance.com", "REST API", "/api/v3/...")
    binance_usdm_ws_url: str = _base_url(
        "wss://fstream.binance.com",
        "USDⓈ-M futures streams",
        "/public/stream?streams=... (books, bookTicker) or /market/stream?streams=... (the rest)",
    )
    binance_usdm_rest_url: str = _base_url("https://fapi.binance.com", "USDⓈ-M futures REST API", "/fapi/v1/...")
    binance_coinm_ws_url: str = _base_url("wss://dstream.binance.com", "COIN-M futures streams", "/stream?streams=...")
    binance_coinm_rest_url: str = _base_url("https://dapi.binance.com", "COIN-M futures REST API", "/dapi/v1/...")
    listing_refresh_seconds: float = _setting(
        600.0,
        "How often beat reads the exchangeInfo of each market with a market subscription (`subscribe "
        "--all`) or subscribed futures contracts: new listings are added, halted and delisted symbols "
        "stopped, every change recorded in `listing_changes`; the day's first read is kept in "
        "`exchange_info_snapshots`. Replaces LISTING_CHECK_INTERVAL_SECONDS, still read when this is unset.",
        _POSITIVE,
    )
    binance_archive_url: str = _setting(
        "https://data.binance.vision",
        "Base URL of Binance's public data archive (daily zips of trades, aggTrades and klines) "
        "that `backfill` takes whole days from; /data/spot/daily/... is appended.",
    )
    default_streams: str = _setting("trade,ticker", "Stream kinds recorded when subscribe() is called without streams.")
    startup_symbols: str = _setting("", "Symbols (comma-separated) that `binance-recorder run` subscribes at start-up.")
    max_streams_per_connection: int = _setting(
        1024, "Streams per websocket connection (Binance allows at most 1024).", 1, 1024
    )
    stream_worker_concurrency: int = _setting(
        8,
        "Processes of the `streams` worker: each holds one group's connection, so this "
        "is the most groups one worker records.",
        1,
    )
    redis_prefix: str = _setting("recorder", "Prefix of every Redis key the service owns.")
    redis_socket_timeout_seconds: float = _setting(
        5.0,
        "Longest any Redis command or connect of the service (its own clients, Celery's broker and "
        "result backend) may wait; a half-open link fails after this instead of hanging.",
        _POSITIVE,
    )
    flush_interval_ms: int = _setting(
        25,
        "Longest time a received frame waits in a subscription task before RPUSH; also the shortest "
        "time between the starts of two drain rounds while the drain has no backlog.",
        1,
    )
    local_buffer_max_frames: int = _setting(
        200000,
        "Frames a subscription task keeps in memory while Redis is unreachable; "
        "past it the oldest are dropped and counted.",
        1,
    )
    redis_buffer_max_frames: int = _setting(
        2000000,
        "Longest a group's Redis list may grow while the drain is behind; past it the "
        "oldest frames are trimmed and counted (trade gaps are then backfilled).",
        1,
    )
    drain_interval_seconds: float = _setting(
        1.0,
        "How often beat sends a drain tick: a run lasts 10 of these, then the next tick's run "
        "takes over without a gap; a killed run is replaced within about a tick plus its 3 s lease.",
        _POSITIVE,
    )
    drain_batch_size: int = _setting(
        5000,
        "Most frames taken from one Redis list per database transaction; the drain takes what "
        "is there up to this, so batches grow with the backlog.",
        1,
    )
    drain_lanes: int = _setting(
        2,
        "PostgreSQL only (SQLite has one writer): how many drain runs store side by side, each "
        "its share of the groups' lists. Each holds a default-worker process, and a worker node "
        "holds at most all its processes but one (the lanes it leaves are stored by its runs too), "
        "so the other periodic tasks always have a process.",
        1,
    )
    lease_ttl_seconds: float = _setting(
        10.0,
        "Lifetime of a group's connection lease, renewed about every second by the task "
        "holding it: a dead task's group can restart after at most this long.",
        _POSITIVE,
    )
    supervise_interval_seconds: float = _setting(
        30.0, "How often beat restarts wanted groups whose lease has expired.", _POSITIVE
    )
    reconnect_backoff_max_seconds: float = _setting(
        30.0,
        "Cap of the exponential back-off (with full jitter) between reconnect attempts.",
        0,
    )
    connect_attempts_per_5_minutes: int = _setting(
        250,
        "Websocket connection attempts allowed per 5 minutes for all groups together (Binance bans past 300 per IP).",
        1,
        300,
    )
    connection_max_age_seconds: float = _setting(
        85800.0,
        "Age at which a connection is replaced (new one first, old one closed once the "
        "new one delivers), ahead of Binance's 24 h disconnect.",
        _POSITIVE,
        86400,
    )
    silence_timeout_seconds: float = _setting(
        60.0,
        "A connection that delivers no frame for this long is replaced, although pings may still flow.",
        _POSITIVE,
    )
    stale_stream_seconds: float = _setting(
        300.0,
        "`status` warns (exit 1) when a subscribed trade, aggTrade, diff-depth or (futures) markPrice "
        "stream stores nothing for this long while its group's connection is up (other streams of the group may flow); "
        "raise it for illiquid symbols, 0 turns the check off.",
        0,
    )
    rest_timeout_seconds: float = _setting(10.0, "Timeout of one REST request to Binance.", _POSITIVE)
    rest_weight_budget_per_minute: int = _setting(
        3000,
        "REST request weight all workers together may spend per UTC minute (Binance "
        "allows 6000 per IP); a request that would exceed it waits for the next minute.",
        1,
        6000,
    )
    futures_rest_weight_budget_per_minute: int = _setting(
        1200,
        "REST request weight all workers together may spend per UTC minute on the futures APIs, "
        "/fapi and /dapi together (Binance allows 2400 per IP for both); separate from spot's budget.",
        1,
        2400,
    )
    open_interest_interval_seconds: float = _setting(
        60.0,
        "How often beat polls the open interest of every subscribed futures symbol (weight 1 each, "
        "from the futures budget): Binance streams none.",
        _POSITIVE,
    )
    rest_max_wait_seconds: float = _setting(
        300.0,
        "Longest a REST request waits out a Binance back-off (429) or IP ban (418); a "
        "longer one fails the request with an error saying until when.",
        0,
    )
    backfill_interval_seconds: float = _setting(
        60.0,
        "How often beat runs the backfill task that finds and fills recent gaps.",
        _POSITIVE,
    )
    audit_enabled: bool = _setting(
        True,
        "Whether beat audits the recorded trades and aggregate trades of each wanted symbol's last "
        "AUDIT_LOOKBACK_DAYS closed days against the public data archive and REST once the archive has "
        "them (`binance-recorder audit`); each audit reads the whole day from REST.",
    )
    audit_interval_seconds: float = _setting(
        3600.0, "How often beat looks for recorded days to audit (when AUDIT_ENABLED).", _POSITIVE
    )
    audit_lookback_days: int = _setting(
        2, "How many closed UTC days back the periodic audit looks for days not audited yet.", 1
    )
    backfill_lookback_seconds: int = _setting(
        21600,
        "How far back the periodic backfill looks for missing trade ids, aggregate trade ids and kline slots.",
        1,
    )
    depth_snapshot_limit: int = _setting(
        1000,
        "Levels per side of the REST depth snapshots that start and resync order books "
        "(weight 50 up to 1000, 250 above): 1000 keeps a book deep enough for any --levels "
        "a user asks while costing a fifth of 5000.",
        1,
        5000,
    )
    depth_snapshot_deep_books: int = _setting(
        100,
        "How many books per market, the most active by diff-depth events per second, get snapshots of "
        "DEPTH_SNAPSHOT_LIMIT levels; the others get the cheapest depth (spot: 100 levels, weight 5, a "
        "tenth of 1000 levels'), so that 1,500 books sync in 4 minutes of the default budget, not 25.",
        0,
    )
    depth_snapshot_interval_seconds: float = _setting(
        3600.0,
        "A fresh depth snapshot per recorded book this often, so that rebuilding a book "
        "replays at most this much of diff-depth (an hour of depth@100ms takes about a second).",
        _POSITIVE,
    )
    sqlite_busy_timeout_ms: int = _setting(10000, "How long a SQLite writer waits for a lock before failing.", 0)
    retention_days: int = _setting(30, "Days of data every table keeps (by its time column); 0 keeps everything.", 0)
    retention_overrides: str = _setting(
        "klines=0",
        "Per-table days that replace RETENTION_DAYS, as TABLE=DAYS pairs such as "
        "`tickers=7,book_tickers=2`; 0 keeps that table for ever. Setting it replaces "
        "this default: include `klines=0` to go on keeping klines.",
    )
    retention_chunk_rows: int = _setting(
        10000,
        "Rows deleted per transaction by the retention task, so it never blocks the drain for long.",
        1,
    )
    retention_interval_seconds: float = _setting(3600.0, "How often beat runs the retention task.", _POSITIVE)
    retention_requires_archive: bool = _setting(
        True,
        "Retention deletes only whole UTC days that the archiver has written to day files "
        "(ARCHIVE_DIR) and that have not changed since; false deletes by age alone, archived or not.",
    )
    archive_dir: str = _setting(
        "",
        "Folder of the day files (Parquet, one per table, UTC day and symbol); empty: `archive` "
        "beside the SQLite database file (data/archive by default), or data/archive with PostgreSQL.",
    )
    archive_interval_seconds: float = _setting(
        3600.0, "How often beat runs the archiver that writes closed UTC days to day files.", _POSITIVE
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment).

        A value that does not convert to the field's type raises ValueError naming
        the variable, so a typo in a compose file fails loudly at start-up.
        """
        environ = os.environ if environ is None else environ
        renamed = {old: new for old, new in RENAMED.items() if old in environ and new not in environ}
        environ = {**environ, **{new: environ[old] for old, new in renamed.items()}} if renamed else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.name.upper()
            if name not in environ:
                continue
            raw = environ[name]
            try:
                values[f.name] = _convert(raw, type(f.default))
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={raw!r} is not a valid "
                    f"{type(f.default).__name__}; unset it to use the default {f.default!r}"
                ) from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse numbers outside their range and databases the storage cannot use.

        A batch size of 0 would make a drain read a whole list, a negative flush
        interval busy-loop: such values stop the service at start-up instead.
        """
        for f in dataclasses.fields(self):
            low, high = f.metadata["range"]
            value = getattr(self, f.name)
            if (low is not None and value < low) or (high is not None and value > high):
                limits = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ValueError(
                    f"environment variable {f.name.upper()}={value!r} is out of range: it must be "
                    f"{limits}; unset it to use the default {f.default!r}"
                )
        backend = self.database_url.split(":", 1)[0].split("+", 1)[0]
        if backend not in SUPPORTED_DATABASES:
            raise ValueError(
                f"DATABASE_URL={self.database_url!r} is not supported: use sqlite:///path/to/file.db "
                "or postgresql+psycopg://user:password@host/database"
            )

    def ws_url(self, market: str) -> str:
        """The websocket base URL of a market (`spot`, `usdm`, `coinm`)."""
        return {SPOT: self.binance_ws_url, USDM: self.binance_usdm_ws_url, COINM: self.binance_coinm_ws_url}[market]

    def rest_url(self, market: str) -> str:
        """The REST base URL of a market (`spot`, `usdm`, `coinm`)."""
        return {SPOT: self.binance_rest_url, USDM: self.binance_usdm_rest_url, COINM: self.binance_coinm_rest_url}[
            market
        ]

    @property
    def archive_path(self) -> Path:
        """ARCHIVE_DIR, or `archive` in the folder of the SQLite file (the data dir)."""
        from sqlalchemy.engine import make_url

        if self.archive_dir:
            return Path(self.archive_dir)
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return Path(url.database).parent / "archive"
        return Path("data") / "archive"

    @property
    def default_stream_kinds(self) -> list[str]:
        return split_list(self.default_streams)

    @property
    def redis_connection_options(self) -> dict[str, Any]:
        """Keyword arguments of every Redis client the service makes.

        Without a read timeout a command on a half-open link (a failing-over cloud Redis,
        a NAT that forgot the connection) waits for the kernel's TCP timeout, minutes;
        measured: a subscription task blocked 60 s while its lease expired. The health
        check pings a connection idle that long before reusing it.
        """
        return {
            "socket_timeout": self.redis_socket_timeout_seconds,
            "socket_connect_timeout": self.redis_socket_timeout_seconds,
            "socket_keepalive": True,
            "health_check_interval": max(1, int(self.redis_socket_timeout_seconds)),
        }


def _convert(raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(raw)
    return kind(raw.strip()) if kind in (int, float) else raw


def split_list(text: str | None) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]: how settings and command-line options spell lists."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def documented_settings() -> list[tuple[str, Any, str]]:
    """(ENV_NAME, default, doc) for every setting: the source of the table in docs/settings.md."""
    return [(f.name.upper(), f.default, f.metadata["doc"]) for f in dataclasses.fields(Settings)]


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
