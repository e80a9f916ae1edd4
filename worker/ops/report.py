"""Renders a status snapshot (worker/ops/status.py) as tables a person reads at a glance."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TextIO

from worker.exchange.listings import TRADING
from worker.streams import MARKETS, SPOT
from worker.times import utc_text

# Spot's tables are always listed; a futures market's only once it has rows, so that a
# spot recorder's status keeps its one screen (the JSON form lists every table).
SPOT_TABLES = frozenset(MARKETS[SPOT].tables)
BOOKS_LISTED = 20
"""Up to this many recorded books are listed one a line; more (a whole market's 1,500)
are summed up in the books line, so that `status` stays one screen (`--json` lists all)."""


def age(ms: int | None, now_ms: int) -> str:
    """'4s', '3m 20s', '2h 5m', '3d 4h' ago-style durations; '-' when unknown."""
    if ms is None:
        return "-"
    seconds = max(0, (now_ms - ms) // 1000)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit} {seconds % size // smaller_size}{smaller}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric, strict=False)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float)


def _memory_text(memory: dict[str, int]) -> str:
    used = f"{memory['used'] / 2**20:.1f} MiB"
    if not memory["max"]:
        return f"{used} (no maxmemory set)"
    return f"{used} of {memory['max'] / 2**20:.0f} MiB maxmemory ({memory['used'] / memory['max']:.0%})"


def render_status(snapshot: dict[str, Any], problems: Sequence[str]) -> str:
    now = snapshot["generated_at"]
    subscribed = snapshot.get("market_subscriptions", [])
    summarized = {summary["market"] for summary in subscribed}
    groups = [
        (
            g["id"],
            g["market"],
            ",".join(g["symbols"]),
            g["streams"],
            g["state"] if g["live"] or g["state"] == "waiting" else "NOT RUNNING",
            age(g["connected_since"], now) if g["state"] == "connected" else "-",
            g["messages_per_second"],
            age(g["last_message_at"], now),
            g["reconnects"],
            g["backlog"],
        )
        for g in snapshot["groups"]
        if g["market"] not in summarized
    ]
    tables = [
        (name, t["rows"], utc_text(t["newest"]), age(t["newest"], now))
        for name, t in snapshot["tables"].items()
        if t["rows"] or name in SPOT_TABLES
    ]
    parts = [
        table(
            ["GROUP", "MARKET", "SYMBOLS", "STREAMS", "STATE", "UP", "MSG/S", "LAST MSG", "RECONNECTS", "BACKLOG"],
            groups,
        )
        if groups or subscribed
        else "no groups subscribed: run `binance-recorder subscribe BTCUSDT`",
        "",
        table(["TABLE", "ROWS", "NEWEST (UTC)", "AGE"], tables),
        "",
        f"dead letters: {snapshot['dead_letters']}   frames drained: {snapshot['frames_drained']}   "
        f"frames trimmed: {snapshot['frames_trimmed']}   backlog: {snapshot['backlog']}",
        f"redis memory: {_memory_text(snapshot['redis_memory'])}",
        f"drains: {_drains_text(snapshot['drains'])}",
    ]
    if subscribed:
        lines = [_market_subscription_line(summary) for summary in subscribed]
        parts[0:1] = [*lines, parts[0]] if groups else lines
    if snapshot.get("book_sync"):
        listed = [_books_table(snapshot["books"], now)] if len(snapshot["books"]) <= BOOKS_LISTED else []
        parts[2:2] = [*listed, *(_book_sync_text(outlook) for outlook in snapshot["book_sync"]), ""]
    if snapshot.get("audits"):
        parts[-3:-3] = [_audits_table(snapshot["audits"]), ""]
    if snapshot.get("listing_changes"):
        parts[2:2] = [_listing_changes_text(snapshot["listing_changes"]), ""]
    parts.append("status: healthy" if not problems else "status: UNHEALTHY\n" + "\n".join(f"  - {p}" for p in problems))
    return "\n".join(parts)


def _market_subscription_line(summary: dict[str, Any]) -> str:
    """A market subscription's groups in one line (`status --json` lists each group)."""
    quotes = ",".join(summary["quote_assets"]) or "any"
    return (
        f"{summary['market']} market subscription ({','.join(summary['kinds'])}; quote {quotes}; "
        f"status {','.join(summary['statuses'])}): {summary['symbols']} symbols, {summary['streams']} streams, "
        f"{summary['connections']} connections: {summary['recording']} recording, {summary['waiting']} waiting; "
        f"{summary['messages_per_second']} msg/s, backlog {summary['backlog']}"
    )


def _audits_table(audits: Sequence[dict[str, Any]]) -> str:
    """The latest audits (`binance-recorder audit`): which source REST contradicted."""
    rows = [
        (a["symbol"], a["kind"], a["day"], a["verdict"], a["wrong"] or "-", a["rest_rows"], a["recorded_rows"],
         "-" if a["archive_rows"] is None else a["archive_rows"])
        for a in audits
    ]  # fmt: skip
    return table(["AUDITED", "KIND", "DAY", "VERDICT", "WRONG", "REST", "RECORDED", "ARCHIVE"], rows)


def _drains_text(drains: Sequence[dict[str, Any]]) -> str:
    """Which process stores which lane (on SQLite, one lane: the whole buffer)."""
    if not drains:
        return "no run storing"
    return ", ".join(f"lane {drain['lane']} by {drain['holder']}" for drain in drains)


def _listing_changes_text(changes: Sequence[dict[str, Any]]) -> str:
    """One line per symbol whose status changed, newest first; stopped ones say so."""
    lines = []
    for change in changes:
        line = (
            f"{change['market']} {change['symbol']}: {change['old_status'] or 'unknown'} -> "
            f"{change['new_status']} at {utc_text(change['changed_at'])}"
        )
        if change["new_status"] != TRADING:
            line += "; its streams were stopped (it no longer trades)"
        lines.append(line)
    return "listing changes:\n" + "\n".join(f"  {line}" for line in lines)


def _books_table(books: Sequence[dict[str, Any]], now: int) -> str:
    rows = [
        (
            b["symbol"],
            b["market"],
            b["state"] if b["gap_since"] is None else f"{b['state']} (gap since {utc_text(b['gap_since'])})",
            b["last_update_id"] if b["last_update_id"] is not None else "-",
            b["updates_per_second"],
            age(b["last_event_time"], now),
        )
        for b in books
    ]
    return table(["BOOK", "MARKET", "STATE", "LAST UPDATE ID", "UPD/S", "LAST UPDATE"], rows)


def _book_sync_text(outlook: dict[str, Any]) -> str:
    """`books: 412 of 1,500 synced, the rest by ~02:41 (budget 1,200/min)` (UTC), per market."""
    market = "" if outlook["market"] == SPOT else f"{outlook['market']} "
    text = f"{market}books: {outlook['synced']:,} of {outlook['books']:,} synced"
    if outlook["rest_by"] is not None:
        text += f", the rest by ~{utc_text(outlook['rest_by'])[11:16]}"
    return text + f" (budget {outlook['budget_per_minute']:,}/min)"


class ProgressBar:
    """One line on a terminal, redrawn in place at most ten times a second.

    When the stream is not a terminal (a log file, CI) it prints a plain line at every
    tenth of the way instead, so logs show progress without a wall of redraws.
    """

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.interactive = stream.isatty()
        self._drawn_at = 0.0
        self._last_tenth = -1

    def update(self, done: float, total: float, detail: str = "") -> None:
        fraction = min(1.0, done / total) if total > 0 else 1.0
        if self.interactive:
            now = time.monotonic()
            if now - self._drawn_at < 0.1 and fraction < 1.0:
                return
            self._drawn_at = now
            filled = int(fraction * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%} {detail}\033[K")
        elif int(fraction * 10) > self._last_tenth:
            self._last_tenth = int(fraction * 10)
            self.stream.write(f"{self.label}: {fraction:.0%} {detail}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
