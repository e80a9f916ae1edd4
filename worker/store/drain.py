"""Moves frames from the Redis lists into the database, round by round.

Order matters for invariant 1 (nothing acknowledged is lost): claim a batch from every
list (read, not removed), parse it, commit it in one transaction, and only then remove
it from Redis. A drain that dies in between leaves the batch in Redis; the next drain
stores it again and the natural primary keys make that a no-op (invariant 2).

A drain run is a window, not a sweep: it keeps storing what arrives, in rounds that
take whatever each list holds (up to a batch), so a round is as large as the backlog;
after an empty round it blocks on the flushes' doorbell (`FrameBuffer.wait_for_frames`)
and wakes as the next flush lands. Runs relay through
`DrainShift`, a short lease renewed in the background. Once its window is over, a run
asks for relief; the next beat tick's run then asks it to hand over, and it does after
its current round, handing the lease straight to the new run. Ticks during the window
see a live holder that wants no relief and return at once. So storage never pauses
between runs, two runs never store at once, a lost beat tick just leaves the running
run running, and a killed run's successor starts once the lease lapses
(`DRAIN_LEASE_TTL_SECONDS`). Relief every window, not every tick: a hand-over per second
took an idle drain from 0.9% to 2.5% of a core (Celery's task start and end, the
thread, the polls), against 0.9% for the old run-per-tick sweep.

Lanes: SQLite has one writer, so one run stores at a time, for every list. PostgreSQL
takes many, so there the lists are dealt out to `DRAIN_LANES` lanes (list i of the
sorted lists to lane i mod the lane count), each with its own relay: up to that many
runs store side by side, on any workers or machines, each in its own transaction. A
run takes the first lane it can (`take_a_lane`) and also stores, round by round, the
lists of lanes nobody holds (`DrainLanes`): lanes never wait for a free worker process,
and one run alone stores everything. Two runs may meet on a list for a round (a lane is
taken, the lists are dealt anew as groups come and go); that costs work, not data: the
acknowledgement removes only what no other run removed since the claim (the buffer's
head counter), and the natural primary keys make the second copy of a row a no-op.

Lanes are dealt by list, so one group's traffic is always stored by one lane. One
stream's frames are in two lists only while it moves between groups (unsubscribed and
subscribed again, it joins the first group with room, and its old list still holds its
last frames); two lanes may then store them side by side. That is allowed rather than
prevented, because it cannot corrupt what is stored: rows are keyed; an open kline is
only replaced by a version no older than the stored one (`storage._insert_statement`),
whatever order the runs commit in; and a book's continuity state, read at a round's
start and saved whole after its commit (last writer wins), is true of the rows the
saving run committed. So the stored book (rebuilt from rows by `book_at`, which checks
the chain itself) is exact, a real break always leaves its gaps row and its snapshot
request, and a stale state costs at worst a false break: the book is marked unknown
until the next snapshot. tests/test_drain_lanes.py races both orders. Preventing it
would take a lock per symbol across lanes in every round, for a few rounds per move.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import orjson
import redis
from sqlalchemy.engine import Engine

from worker.buffer import Claim, FrameBuffer
from worker.exchange.listings import ListingWatch, apply_contract_info
from worker.groups import GroupRegistry
from worker.keys import RedisKeys, as_text
from worker.lease import Lease
from worker.store.books import BookCache, follow_books
from worker.store.parsing import ParsedBatch, Row, parse_frames
from worker.store.storage import store_rows
from worker.streams import MARKETS, USDM
from worker.times import now_ms

# Prefix of the service counters (RedisKeys.counters) of rows stored, one per table.
ROWS_STORED_COUNTER = "rows_stored:"

# Dead letters kept for inspection; older ones are trimmed (the counter keeps counting).
DEAD_LETTERS_KEPT = 10_000

# Longest wait on the doorbell after a round that found nothing. A flush wakes the drain
# at once, so this only bounds how late the run notices a successor, a shutdown, or
# frames pushed without a ring (by an older version). Polling every 5-50 ms instead
# cost an idle drain 1.1% of a core (measured in-process over 10 s), most of it
# Redis round trips; four waits a second cost next to nothing.
IDLE_WAIT_SECONDS = 0.25

# The drain lock's lifetime, renewed every third of it by a thread of the run holding
# it, whatever the run is doing (a commit waiting for a locked database included): a
# killed run's successor takes over within this long. Three seconds leave room for a
# renewal delayed by a loaded machine; the old fixed lock outlived a killed run by 70 s.
DRAIN_LEASE_TTL_SECONDS = 3.0
# How many runs of a node that already stores a lane pass on a free lane before one
# takes it (`take_a_lane`): beat ticks go to whichever node's process asks first, so
# another node with a free process gets one of five in a row but for 1 time in 32.
SPREAD_PASSES = 5
# How often a run waiting for the lock looks at it.
HANDOVER_POLL_SECONDS = 0.01

# Give the lease to the waiting successor, atomically, so nobody else can take it in between.
_HAND_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local successor = redis.call('GET', KEYS[2])
if not successor then
  return 0
end
redis.call('SET', KEYS[1], successor, 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


# One look of a run that wants the lock, atomic so that no hand-over falls between two
# reads: "handed" (the holder gave it to us), "free" (nobody held it: taken, and our
# request withdrawn), "busy" (on the first look (ARGV[3] = 1): a live holder that has
# not asked for relief (KEYS[3] holds its token once it does): nothing to do),
# "superseded" (a newer run replaced our request: it takes over instead, so at most
# one run ever waits), or "waiting" (our request, placed on the first look and renewed
# on later ones, stands).
_POLL = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return 'handed'
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('DEL', KEYS[2])
  end
  return 'free'
end
if ARGV[3] == '1' and redis.call('GET', KEYS[3]) ~= holder then
  return 'busy'
end
if ARGV[3] == '0' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'superseded'
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 'waiting'
"""

# A run that waited long enough withdraws its request, unless the lock was handed to
# it meanwhile (1: it holds the lock after all).
_GIVE_UP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 0
"""


@dataclass
class DrainReport:
    frames: int = 0
    dead_letters: int = 0
    control: int = 0
    batches: int = 0
    rows: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "dead_letters": self.dead_letters,
            "control": self.control,
            "batches": self.batches,
            "rows": dict(self.rows),
        }


class Drainer:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        engine: Engine,
        batch_size: int,
        lanes: DrainLanes | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.engine = engine
        self.batch_size = batch_size
        self.lanes = lanes or DrainLanes(client, keys, lanes=1, lane=0)
        self.buffer = FrameBuffer(client, keys)
        self.registry = GroupRegistry(client, keys)
        self.books = {market: BookCache(market) for market in MARKETS}
        self._marked: dict[str, int] = {}  # stored_at field -> when this run last wrote it
        self._backlog = False  # whether the last round left frames behind (a list gave a whole batch)

    def drain(self, time_budget: float, should_stop: Callable[[], bool] = lambda: False) -> DrainReport:
        """Drain every list until all are empty, the time budget is spent, or the worker
        shuts down (between rounds: a started round is always finished)."""
        report = DrainReport()
        deadline = time.monotonic() + time_budget
        while time.monotonic() < deadline and not should_stop():
            if not self.store_round(report):
                break
        self.forget_unwanted_empty_lists()
        return report

    def drain_window(self, keep_going: Callable[[], bool], round_seconds: float = 0.0) -> DrainReport:
        """Store what arrives, round after round, for as long as `keep_going()` (asked
        before every round) says so; wait for the next flush while nothing comes.

        A round that stored something and left no backlog (no list gave a whole batch)
        is followed by the next one `round_seconds` after it started, not at once. Each
        group's frames come in flushes (every `FLUSH_INTERVAL_MS`), and a drain that
        went on at once stored the flushes one by one as they landed: at the whole
        market's mix (six groups) rounds of a few hundred frames, and a round costs
        about 2.7 ms whatever its size, 14 us a row in rounds of 500 frames against
        9.6 in rounds of 2,000 (docs/performance.md). A backlog is stored at once."""
        report = DrainReport()
        while keep_going():
            started = time.monotonic()
            lists = self.lanes.lists(self.buffer.list_keys())
            claimed = self.store_round(report, lists)
            if not claimed:
                self.buffer.wait_for_frames(lists, IDLE_WAIT_SECONDS)
            elif not self._backlog:
                time.sleep(max(0.0, started + round_seconds - time.monotonic()))
        self.forget_unwanted_empty_lists()
        return report

    def store_round(self, report: DrainReport, lists: list[str] | None = None) -> int:
        """Claim up to a batch from every list (or those given), store it all in one
        transaction, remove it from Redis; returns how many elements were claimed (0:
        every list was empty)."""
        lists = self.buffer.list_keys() if lists is None else lists
        claims = [claim for claim in self.buffer.claim_many(lists, self.batch_size) if claim.elements]
        self._backlog = any(len(claim.elements) == self.batch_size for claim in claims)
        if not claims:
            return 0
        parsed = [parse_frames(claim.elements, self.keys.frames_market(claim.key)) for claim in claims]
        rows = _merged_rows(parsed)
        with self.engine.begin() as conn:
            stored = store_rows(conn, rows)
            # Order-book continuity is checked here, where the events are stored (see
            # worker/store/books.py); the states are saved once the rows are committed.
            followed = [
                follow_books(conn, self.client, self.keys, depth_rows, now_ms(), market.name, self.books[market.name])
                for market in MARKETS.values()
                if (depth_rows := rows.get(market.table("depth")))
            ]
        for books in followed:
            self.books[books.market].save(self.client, self.keys, books)
        if contract_info := rows.get(MARKETS[USDM].table("contractInfo")):
            apply_contract_info(
                self.registry, ListingWatch(self.client, self.keys), self.engine, contract_info, now_ms()
            )
        marks = self._marks_due(stored_marks(rows, now_ms()))
        self._acknowledge(claims, parsed, stored, marks)
        self._marked.update(marks)
        report.batches += len(claims)
        report.rows.update(stored)
        for batch in parsed:
            report.frames += batch.frames
            report.control += batch.control
            report.dead_letters += len(batch.dead_letters)
        return sum(len(claim.elements) for claim in claims)

    def _marks_due(self, marks: dict[str, int]) -> dict[str, int]:
        """The `stored_at` marks this run did not write within `STORED_AT_RESOLUTION_MS`."""
        return {field: ms for field, ms in marks.items() if ms - self._marked.get(field, 0) >= STORED_AT_RESOLUTION_MS}

    def forget_unwanted_empty_lists(self) -> None:
        wanted = self.registry.wanted()
        for key in self.buffer.list_keys():
            gid = key.rsplit(":", 1)[-1]
            if gid not in wanted and not self.registry.has_live_lease(gid):
                self.buffer.forget_if_empty(key)

    def _acknowledge(
        self, claims: list[Claim], parsed: list[ParsedBatch], stored: dict[str, int], marks: dict[str, int]
    ) -> None:
        """Record dead letters, counters and what was stored when (`marks`), and remove
        the batches, all in one transaction.

        The rows stored per table are counted for the metrics exporter's rows/s
        (worker/ops/metrics.py): counting the tables themselves costs a full scan."""
        with self.client.pipeline(transaction=True) as pipe:
            for claim, batch in zip(claims, parsed, strict=True):
                if batch.dead_letters:
                    self._record_dead_letters(pipe, claim, batch)
                self.buffer.ack(claim, batch.last_mark, batch.next_seq, pipe)
            pipe.hincrby(self.keys.counters, "frames_drained", sum(batch.frames for batch in parsed))
            for table, rows in stored.items():
                if rows > 0:  # a driver that cannot count says -1
                    pipe.hincrby(self.keys.counters, f"{ROWS_STORED_COUNTER}{table}", rows)
            if marks:
                pipe.hset(self.keys.stored_at, mapping={field: ms for field, ms in marks.items()})
            pipe.execute()

    def _record_dead_letters(self, pipe: redis.client.Pipeline, claim: Claim, batch: ParsedBatch) -> None:
        at = now_ms()
        pipe.rpush(
            self.keys.dead_letters,
            *(
                orjson.dumps(
                    {"reason": d.reason, "frame": d.frame.decode(errors="replace"), "at": at, "buffer": claim.key}
                )
                for d in batch.dead_letters
            ),
        )
        pipe.ltrim(self.keys.dead_letters, -DEAD_LETTERS_KEPT, -1)
        pipe.hincrby(self.keys.counters, "dead_letters", len(batch.dead_letters))


STORED_AT_RESOLUTION_MS = 1000
"""A run writes a symbol's `stored_at` mark at most this often: `status` reads the marks
in seconds (`STALE_STREAM_SECONDS`, default 300), and at the whole market's mix a round
stores rows of a thousand symbols or more, twenty rounds a second: a mark per symbol
and table every round was most of the acknowledgement's work (docs/performance.md)."""

WATCHED_KINDS = ("trade", "aggTrade", "depth", "markPrice")
"""Kinds of the streams whose silence `status` reports (`STALE_STREAM_SECONDS`): a
trade, book or mark-price stream that stores nothing while its connection is up is one
Binance stopped sending (a futures stream on the wrong route, a settled contract), or
a symbol that stopped trading. A futures mark price comes every 3 s whatever trades."""

WATCHED_TABLES: dict[str, str] = {
    market.table(kind): kind for market in MARKETS.values() for kind in WATCHED_KINDS if kind in market.kinds
}
"""The tables of the watched kinds in every market (`usdm_agg_trades`...) -> their kind.
Their rows start with the symbol."""


def stored_at_field(table: str, symbol: str) -> str:
    """The field of `RedisKeys.stored_at` that says when `symbol`'s rows last went into `table`."""
    return f"{table}:{symbol}"


def stored_marks(rows: dict[str, list[Row]], now: int) -> dict[str, int]:
    """`stored_at` fields -> `now` for every symbol the round stored in a watched table.
    One set per table over the round's rows, written with the acknowledgement: noting
    costs no Redis round trip, and per symbol, not per group, so that one silent stream
    shows among flowing ones."""
    return {
        stored_at_field(table, symbol): now
        for table in WATCHED_TABLES
        for symbol in {row[0] for row in rows.get(table, ())}
    }


def _merged_rows(parsed: list[ParsedBatch]) -> dict[str, list[Row]]:
    """The rows of every list's batch by table (lists of several markets: their
    tables), for one transaction."""
    if len(parsed) == 1:
        return parsed[0].rows
    merged: dict[str, list[Row]] = {}
    for batch in parsed:
        for table, rows in batch.rows.items():
            merged.setdefault(table, []).extend(rows)
    return merged


def drain_lanes(engine: Engine, configured: int) -> int:
    """How many drain runs may store side by side: `DRAIN_LANES` on PostgreSQL, one on
    SQLite (one writer: a second would only wait for the database lock)."""
    return configured if engine.dialect.name == "postgresql" else 1


@dataclass(frozen=True)
class DrainLanes:
    """Which lists a run holding `lane` stores: its lane's, and those of lanes nobody holds."""

    client: redis.Redis
    keys: RedisKeys
    lanes: int
    lane: int

    def lists(self, all_lists: list[str]) -> list[str]:
        """A round's share of `all_lists` (sorted): one Redis call per round, none with one lane."""
        if self.lanes == 1:
            return all_lists
        dealt = min(self.lanes, len(all_lists))
        if not dealt:
            return all_lists
        held = drain_holders(self.client, self.keys, dealt)
        mine = {lane for lane in range(dealt) if lane == self.lane or lane not in held}
        return [key for index, key in enumerate(all_lists) if index % dealt in mine]


def drain_holders(client: redis.Redis, keys: RedisKeys, lanes: int) -> dict[int, str]:
    """Lane -> the process storing it (`pid@node`), for the lanes a run holds."""
    values = client.mget([keys.drain_lock(lane) for lane in range(lanes)])
    return {
        lane: as_text(value).split(":", 1)[0].removeprefix("drain-")
        for lane, value in enumerate(values)
        if value is not None
    }


def lanes_per_node(processes: int) -> int:
    """The most lanes one worker node holds: all its processes but one, at least one.

    A lane holds a process for good (its runs relay without a gap), so a node holding
    as many lanes as it has processes has none left for supervise, backfill, book
    snapshots and retention: a single default node of two processes with
    `DRAIN_LANES=2` held both and starved them. A lane no node takes is still stored,
    by the running runs (`DrainLanes`: they also store the lanes nobody holds)."""
    return max(1, processes - 1)


def take_a_lane(
    client: redis.Redis,
    keys: RedisKeys,
    window_seconds: float,
    lanes: int,
    node: str | None = None,
    node_processes: int | None = None,
) -> DrainShift | None:
    """The shift of the first lane this run can hold (lanes beyond the number of lists
    have nothing to store: not tried), or None when every lane has a run storing.

    Lanes spread over the worker nodes (`node`: this run's, default the host name): a
    run whose node already stores a lane passes on a lane it could take, so that a run
    of another node takes it, unless runs of its node already passed on it
    `SPREAD_PASSES` times in a row (there is no other node with a free process: the
    node takes it, and its CPU stores two lanes). The lane is stored meanwhile by the
    running runs (`DrainLanes`). A lane went to whichever process took a tick while it
    was free, so two nodes with two processes each often stored both lanes on one node
    while the other stood by (`python -m bench.scaleout`: 0.72 and 0.05 of a core).

    A node of `node_processes` processes holds at most `lanes_per_node` of them (no cap
    when unknown: a run outside a worker)."""
    node = node or socket.gethostname()
    most = lanes_per_node(node_processes) if node_processes else lanes
    count = min(lanes, max(1, len(FrameBuffer(client, keys).list_keys())))
    holders = drain_holders(client, keys, count)
    on_this_node = {lane for lane, holder in holders.items() if holder.split("@", 1)[-1] == node}
    for lane in range(count):
        others = on_this_node - {lane}  # the lane's own hand-over between this node's runs is no new lane
        if len(others) >= most or (others and _pass_on(client, keys, lane, taken=lane in holders)):
            continue
        shift = DrainShift(client, keys, window_seconds, lane=lane, node=node)
        if shift.take_over():
            client.delete(keys.drain_passes(lane))
            if _past_the_node_cap(client, keys, count, node, lane, most):
                shift.lease.release()
                return None
            return shift
    return None


def _past_the_node_cap(client: redis.Redis, keys: RedisKeys, count: int, node: str, lane: int, most: int) -> bool:
    """Whether `lane`, just taken, is one too many for its node: two runs of one node
    that looked at the holders at once (beat ticks that waited in the queue arrive
    together) may each have taken a lane. The node keeps its `most` lowest lanes, so of
    two such runs exactly one gives its lane back."""
    mine = sorted(
        held for held, holder in drain_holders(client, keys, count).items() if holder.split("@", 1)[-1] == node
    )
    return lane in mine[most:]


def _pass_on(client: redis.Redis, keys: RedisKeys, lane: int, taken: bool) -> bool:
    """Whether a run of a node that stores another lane leaves `lane` to other nodes:
    yes while fewer than `SPREAD_PASSES` runs passed on it in a row. Passes count only
    while the lane can be had (free, or its holder asks for relief)."""
    if taken and client.get(keys.drain_relief(lane)) != client.get(keys.drain_lock(lane)):
        return True  # its holder stays: nothing to pass on, nothing to count
    passes = keys.drain_passes(lane)
    with client.pipeline(transaction=True) as pipe:
        pipe.incr(passes)
        pipe.pexpire(passes, int(SPREAD_PASSES * 2 * 1000))
        count = int(pipe.execute()[0])
    return count <= SPREAD_PASSES


class DrainShift:
    """The drain lock (of one lane) as a relay: one run holds it at a time and hands it on with no gap.

    `take_over` takes the lock, or, if the holder has asked for relief, asks it to hand
    the lock over and waits; `held` keeps the lease renewed by a thread while the run
    drains; `keep_going` is the window's condition; on leaving `held` the run hands the
    lock to a waiting successor (or releases it).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        window_seconds: float,
        ttl_seconds: float = DRAIN_LEASE_TTL_SECONDS,
        lane: int = 0,
        node: str | None = None,
    ) -> None:
        self.client = client
        self.lane = lane
        # The token tells operators (`status`), `take_a_lane` and tests which process of
        # which worker node (the Celery node name, else the host name) drains.
        owner = f"drain-{os.getpid()}@{node or socket.gethostname()}"
        self.lease = Lease(client, keys.drain_lock(lane), ttl_seconds, owner=owner)
        self.successor_key = keys.drain_successor(lane)
        self.relief_key = keys.drain_relief(lane)
        self.window_seconds = window_seconds
        self.handed_over_by_holder = False  # how this run got the lock: from a live holder
        self._lost = threading.Event()
        self._hand_over = client.register_script(_HAND_OVER)
        self._poll = client.register_script(_POLL)
        self._give_up = client.register_script(_GIVE_UP)

    @property
    def token(self) -> str:
        return self.lease.token

    def take_over(self) -> bool:
        """Hold the lock: at once if it is free, else once the holder hands it over or
        its lease lapses (it died). False at once if the holder is within its window
        (it goes on), and later if a newer run asked after this one, or nothing changed
        within a lease's lifetime: that run, or the holder, goes on."""
        deadline = time.monotonic() + self.lease.ttl_ms / 1000 + 1
        first = True
        while time.monotonic() < deadline:
            state = self._ask(first)
            if state != b"waiting":
                return state in (b"free", b"handed")
            first = False
            time.sleep(HANDOVER_POLL_SECONDS)
        return bool(self._give_up(keys=[self.lease.key, self.successor_key], args=[self.token]))

    def _ask(self, first: bool) -> bytes:
        state = self._poll(
            keys=[self.lease.key, self.successor_key, self.relief_key], args=[self.token, self.lease.ttl_ms, int(first)]
        )
        self.handed_over_by_holder = state == b"handed"
        return bytes(state)

    @contextmanager
    def held(self) -> Iterator[DrainShift]:
        """Renew the lease in the background while the body runs, then hand it on."""
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(stop,), name="drain-lease", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            stop.set()
            renewer.join()
            if not self._hand_over(keys=[self.lease.key, self.successor_key], args=[self.token, self.lease.ttl_ms]):
                self.lease.release()

    def keep_going(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """The run's condition: through the window, go on (no Redis call: the renewing
        thread watches the lease); after it, ask for relief and go on until a successor
        waits. Stop at once if the lease is lost or the worker shuts down, and after a
        second window without a successor (beat stopped): the task ends now and then."""
        relief_from = time.monotonic() + self.window_seconds
        ends = relief_from + self.window_seconds

        def condition() -> bool:
            if should_stop() or self._lost.is_set():
                return False
            now = time.monotonic()
            if now < relief_from:
                return True
            if now > ends:
                return False
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.relief_key, self.token, px=self.lease.ttl_ms)
                pipe.exists(self.successor_key)
                return not pipe.execute()[1]

        return condition

    def _renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease.ttl_ms / 3000):
            try:
                renewed = self.lease.renew()
            except redis.RedisError:
                continue  # Redis is away: the rounds fail too; try again next time
            if not renewed:
                self._lost.set()
                return
