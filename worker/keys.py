"""Names of every Redis key the service owns, in one place.

Other processes (the `status` command, tests, a dashboard) read these keys, so they
are built here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.streams import MARKETS, SPOT, market_named


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    @property
    def groups(self) -> str:
        """Hash: group id -> JSON of the wanted group (its streams)."""
        return f"{self.prefix}:groups"

    @property
    def buffers(self) -> str:
        """Set of frame-list keys the drain must visit (also of stopped groups)."""
        return f"{self.prefix}:buffers"

    def doorbell(self, list_key: str) -> str:
        """List of at most one element, pushed by every flush into `list_key`: an idle
        drain blocks on the doorbells of the lists it drains."""
        return f"{list_key}:doorbell"

    @property
    def buffer_heads(self) -> str:
        """Hash: frame-list key -> how many elements were ever removed from its head."""
        return f"{self.prefix}:buffer-heads"

    @property
    def dead_letters(self) -> str:
        """List of JSON records {reason, frame, at} the drain could not store."""
        return f"{self.prefix}:dead-letters"

    @property
    def counters(self) -> str:
        """Hash of service-wide counters (frames drained, rows stored, dead letters)."""
        return f"{self.prefix}:counters"

    @property
    def stored_at(self) -> str:
        """Hash: `<table>:<SYMBOL>` -> epoch ms of the last drain round that stored rows of
        that symbol in that table, for the tables of the streams `status` watches for
        silence (trades, agg_trades, depth_updates, futures' mark prices, in every market:
        see `worker.store.drain.WATCHED_TABLES`)."""
        return f"{self.prefix}:stored-at"

    @property
    def connect_attempts(self) -> str:
        """Sorted set of recent websocket connection attempts, shared by all groups."""
        return f"{self.prefix}:connect-attempts"

    @property
    def subscriptions_lock(self) -> str:
        """Lock held while subscribe/unsubscribe change the wanted groups, so that two
        calls at once cannot both plan a group for the same new streams."""
        return f"{self.prefix}:lock:subscriptions"

    @property
    def storage_error(self) -> str:
        """Hash {error, since, last_at, failed_runs} while drain runs fail to store; absent when storing works."""
        return f"{self.prefix}:storage-error"

    def drain_lock(self, lane: int = 0) -> str:
        """Lease of the drain run storing a lane's lists (see `worker.store.drain`); its
        value names the process. SQLite has one lane, the whole buffer."""
        return f"{self.prefix}:lock:drain" if lane == 0 else f"{self.prefix}:lock:drain:{lane}"

    def drain_relief(self, lane: int = 0) -> str:
        """Token of the lane's drain run whose window is over: the next run may ask it to hand over."""
        return f"{self.drain_lock(lane)}:relief"

    def drain_passes(self, lane: int) -> str:
        """How many runs in a row passed on the lane, leaving it to another worker node."""
        return f"{self.drain_lock(lane)}:passes"

    def drain_successor(self, lane: int = 0) -> str:
        """Token of the drain run waiting for the lane's running one to hand over the lock."""
        return f"{self.drain_lock(lane)}:successor"

    @property
    def backfill_lock(self) -> str:
        """Lease of the one gap-repair run (tasks.backfill from beat) in progress."""
        return f"{self.prefix}:lock:backfill"

    @property
    def audit_lock(self) -> str:
        """Lease of the one periodic audit run (tasks.audit from beat) in progress."""
        return f"{self.prefix}:lock:audit"

    def rest_weight(self, minute: int, pool: str = "") -> str:
        """Integer with a TTL: REST request weight spent in one UTC minute (epoch ms // 60000)
        of a budget pool (spot's "", or "futures": /fapi and /dapi share one at Binance)."""
        return f"{self.prefix}:rest{_pool(pool)}:weight:{minute}"

    def rest_backoff_until(self, pool: str = "") -> str:
        """Epoch ms before which no REST request of the pool may be sent (Binance answered 429)."""
        return f"{self.prefix}:rest{_pool(pool)}:backoff-until"

    def rest_banned_until(self, pool: str = "") -> str:
        """Epoch ms until which Binance bans this IP from the pool's APIs (it answered 418)."""
        return f"{self.prefix}:rest{_pool(pool)}:banned-until"

    def backfill_job(self, job: str) -> str:
        """JSON cursor of one history backfill job ("<symbol>:<kind>:<start>:<end>")."""
        return f"{self.prefix}:backfill:job:{job}"

    def backfill_job_lock(self, job: str) -> str:
        """Lease of the one run of a history backfill job in progress."""
        return f"{self.prefix}:lock:backfill:{job}"

    @property
    def open_interest_lock(self) -> str:
        """Lease of the one open interest poll (tasks.poll_open_interest) in progress."""
        return f"{self.prefix}:lock:open-interest"

    @property
    def retention_lock(self) -> str:
        return f"{self.prefix}:lock:retention"

    @property
    def archive_lock(self) -> str:
        return f"{self.prefix}:lock:archive"

    def books(self, market: str = SPOT) -> str:
        """Set of a market's symbols whose diff-depth stream the drain has seen (see `book`)."""
        return f"{self.prefix}:books{_market(market)}"

    def book(self, symbol: str, market: str = SPOT) -> str:
        """Hash: one symbol's book continuity as the drain sees it (state, last update
        id and event time, gap since, updates per second); see worker/store/books.py."""
        return f"{self.prefix}:book{_market(market)}:{symbol}"

    def book_bands(self, market: str = SPOT) -> str:
        """Hash: symbol -> the prices past which a market's book's top leaves the band of
        levels its newest depth snapshot holds (see worker/exchange/snapshots.py)."""
        return f"{self.prefix}:books{_market(market)}:bands"

    def books_needing_snapshot(self, market: str = SPOT) -> str:
        """Set of a market's symbols whose book must be (re)synced from a REST depth snapshot."""
        return f"{self.prefix}:books{_market(market)}:needs-snapshot"

    @property
    def snapshot_lock(self) -> str:
        """Lease of the one depth-snapshot run (tasks.snapshot_books) in progress."""
        return f"{self.prefix}:lock:snapshot-books"

    def frames(self, group_id: str, market: str = SPOT) -> str:
        """List of raw frames (and clock marks) received by one group of `market`.

        The list's name carries the market, which is all the drain needs to store its
        frames in that market's tables (`frames_market`): a writer of futures frames
        pushes them, as received, into the list of its market, nothing more. Spot's
        lists keep the name they always had (`<prefix>:frames:<group>`); futures lists
        are `<prefix>:frames:<market>:<group>`.
        """
        if market == SPOT:
            return f"{self.prefix}:frames:{group_id}"
        return f"{self.prefix}:frames:{market_named(market).name}:{group_id}"

    def frames_market(self, list_key: str) -> str:
        """The market of a frame list named by `frames` (group ids hold no colon)."""
        head, _, _group = list_key.rpartition(":")
        named = head.rpartition(":")[2]
        return named if named in MARKETS and head == f"{self.prefix}:frames:{named}" else SPOT

    @property
    def market_subscriptions(self) -> str:
        """Hash: market -> its market subscription (`subscribe --all`) as JSON (worker/groups.py)."""
        return f"{self.prefix}:market-subscriptions"

    def listing_statuses(self, market: str) -> str:
        """Hash: followed symbol (subscribed, or listed for a market subscription) -> its
        exchangeInfo status when last looked at (worker/exchange/listings.py)."""
        return f"{self.prefix}:listing-statuses:{market_named(market).name}"

    def lease(self, group_id: str) -> str:
        """String with a TTL: the token of the one task allowed to hold the connection."""
        return f"{self.prefix}:lease:{group_id}"

    def starting(self, group_id: str) -> str:
        """Marker with a TTL: a start of this group is queued, do not queue another."""
        return f"{self.prefix}:starting:{group_id}"

    def stop(self, group_id: str) -> str:
        """Flag that tells a running group task to close and exit."""
        return f"{self.prefix}:stop:{group_id}"

    def status(self, group_id: str) -> str:
        """Hash describing the group's connection (state, since, messages, ...)."""
        return f"{self.prefix}:status:{group_id}"

    def stream_processes(self, worker: str) -> str:
        """Integer with a TTL: how many processes a worker consuming `streams` has."""
        return f"{self.prefix}:stream-processes:{worker}"


def _pool(pool: str) -> str:
    return f":{pool}" if pool else ""


def _market(market: str) -> str:
    """The part of a key naming a futures market; spot's keys keep the names they always had."""
    return "" if market == SPOT else f":{market_named(market).name}"


def as_text(value: bytes | str) -> str:
    """A Redis reply as text: the service's clients return bytes (frames are bytes), but
    redis-py's types admit either, depending on `decode_responses`."""
    return value.decode() if isinstance(value, bytes) else value
