"""Symbol groups: which streams share one websocket connection, and which are wanted.

A group is a set of at most `max_streams_per_connection` stream names, and a living
one: a later subscription joins a group with room, an unsubscribe takes its streams
out, and the group's running task follows with SUBSCRIBE / UNSUBSCRIBE on its open
connection (worker/ingest/runner.py). A new group is made only for streams that fit in
no existing one; its id is a hash of its first streams (and of its market, unless spot)
and stays while they change.

A group records one market, and on USDⓈ-M one route (`/public` or `/market`): streams
of another market or route never join it, so every group is one connection URL.
The wanted groups live in Redis, where the supervisor, the `status` command and every
worker can see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.lock import Lock

from worker.keys import RedisKeys, as_text
from worker.streams import (
    PAIR_KINDS,
    SPOT,
    is_pair_kind,
    market_named,
    pair_stream_name,
    stream_kind,
    stream_subject,
    validate_stream_kind,
)

# Set status fields only if the lease (KEYS[2]) still holds this token (ARGV[1]).
_SET_STATUS_IF_HOLDER = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# The fix when every streams process already records a group (each holds one for good).
MORE_STREAM_PROCESSES = (
    "raise STREAM_WORKER_CONCURRENCY and restart the streams worker, or add one "
    "(docker compose up --scale worker-streams=2)"
)

# Binance's own pattern for the `symbol` parameter.
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9\-_.]{1,20}$")


class InvalidSubscription(ValueError):
    """A symbol or stream kind that cannot be subscribed; the message says why."""


@dataclass(frozen=True)
class Group:
    id: str
    streams: tuple[str, ...]
    market: str = SPOT

    @property
    def path(self) -> str:
        """The websocket path of its connection (`/stream`, or USDⓈ-M's `/public/stream`
        or `/market/stream`): every stream of a group has the same one."""
        return market_named(self.market).stream_path(self.streams[0])

    @property
    def symbols(self) -> list[str]:
        """The symbols of its streams; an all-market stream (`!miniTicker@arr`) by its name."""
        return sorted({stream_subject(stream) for stream in self.streams})

    def to_json(self) -> str:
        # Spot's records keep their shape, which is what groups saved before markets had.
        market = {} if self.market == SPOT else {"market": self.market}
        return json.dumps({"id": self.id, "streams": list(self.streams), **market})

    @classmethod
    def from_json(cls, text: str | bytes) -> Group:
        data = json.loads(text)
        return cls(id=data["id"], streams=tuple(data["streams"]), market=data.get("market", SPOT))


@dataclass(frozen=True)
class MarketSubscription:
    """Every symbol of a market that exchangeInfo lists with one of `statuses`, narrowed
    to `quote_assets` (empty: all), recorded with the stream `kinds`. The listing
    follower (worker/exchange/listings.py) keeps its groups in step with the listing."""

    market: str
    kinds: tuple[str, ...]
    quote_assets: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ("TRADING",)

    def follows(self, quote_asset: str | None) -> bool:
        """Whether a symbol quoted in `quote_asset` belongs to this subscription's market."""
        return not self.quote_assets or quote_asset in self.quote_assets

    def to_json(self) -> str:
        return json.dumps(
            {"market": self.market, "kinds": self.kinds, "quote_assets": self.quote_assets, "statuses": self.statuses}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> MarketSubscription:
        data = json.loads(text)
        return cls(data["market"], tuple(data["kinds"]), tuple(data["quote_assets"]), tuple(data["statuses"]))


def group_id(streams: Iterable[str], market: str = SPOT) -> str:
    """A hash of the streams, and of the market unless spot: `btcusdt@aggTrade` is a
    stream of spot and of USDⓈ-M, and their groups must differ. Spot's ids are what
    they always were, so wanted groups saved in Redis keep theirs."""
    text = "/".join(sorted(streams))
    digest = hashlib.sha1((text if market == SPOT else f"{market}|{text}").encode()).hexdigest()
    return f"g{digest[:12]}"


def _list_of_strings(value: object, name: str, example: str) -> list[str]:
    """`value` as a list of strings, or InvalidSubscription naming the first bad element.

    Tasks are called by name from other apps (`send_task`), so anything JSON can carry
    arrives here: None, a number, a bare string, a list holding null or true.
    """
    if isinstance(value, str):
        raise InvalidSubscription(f"{name} must be a list, got the string {value!r}: pass [{value!r}]")
    if not isinstance(value, list | tuple):
        raise InvalidSubscription(f"{name} must be a list of strings such as {example}, got {value!r:.80}")
    for position, element in enumerate(value):
        if not isinstance(element, str):
            raise InvalidSubscription(
                f"{name}[{position}] is {element!r:.80} ({type(element).__name__}), not a string: "
                f"pass a list of strings such as {example}"
            )
    return list(value)


def normalize_symbols(symbols: object) -> list[str]:
    """Upper-case, de-duplicate and check the type and format of the symbols a caller gave.

    A bare string is refused rather than iterated character by character, the usual
    slip of `subscribe.delay("BTCUSDT")`.
    """
    result: dict[str, None] = {}  # ordered, and a set: 100,000 symbols take milliseconds
    for raw in _list_of_strings(symbols, "symbols", "['BTCUSDT']"):
        symbol = raw.strip().upper()
        if not SYMBOL_PATTERN.match(symbol):
            raise InvalidSubscription(f"{raw!r:.80} is not a Binance symbol: use letters and digits such as 'BTCUSDT'")
        result[symbol] = None
    if not result:
        raise InvalidSubscription("no symbols given: pass a list such as ['BTCUSDT']")
    return list(result)


WHOLE_MARKET = "*"
"""The one symbol that subscribes a market: every symbol its listing keeps."""


def is_whole_market(symbols: object, quote_assets: object, statuses: object) -> bool:
    """Whether a subscribe call asks for the whole market (`["*"]`); InvalidSubscription
    for `*` among symbols, or market filters without it."""
    if isinstance(symbols, list | tuple) and WHOLE_MARKET in symbols:
        if len(symbols) > 1:
            raise InvalidSubscription("'*' subscribes the whole market: pass ['*'] alone, or name symbols without it")
        return True
    if quote_assets is not None or statuses is not None:
        raise InvalidSubscription("quote_assets and statuses narrow a market subscription: pass symbols ['*']")
    return False


def normalize_market(market: object) -> str:
    """The market a caller named (`spot`, `usdm`, `coinm`), or InvalidSubscription saying which exist."""
    try:
        return market_named(market if isinstance(market, str) else repr(market)).name
    except ValueError as error:
        raise InvalidSubscription(str(error)) from None


def normalize_stream_kinds(kinds: object, market: str = SPOT) -> list[str]:
    """Check a caller's stream kinds against `market`'s, in their canonical spelling, duplicates removed."""
    result: list[str] = []
    for position, raw in enumerate(_list_of_strings(kinds, "streams", "['trade', 'kline_1m']")):
        try:
            kind = validate_stream_kind(raw, market)
        except ValueError as error:
            raise InvalidSubscription(f"streams[{position}]: {error}") from None
        if kind not in result:
            result.append(kind)
    if not result:
        raise InvalidSubscription("no stream kinds given: pass a list such as ['trade'], or none for DEFAULT_STREAMS")
    return result


def default_kinds(kinds: Sequence[str], market: str) -> list[str]:
    """The kinds of DEFAULT_STREAMS (`kinds`) that `market` streams: COIN-M has no
    `trade`, so its default is the rest. All of them when none fits, for the error
    to name them."""
    fitting = []
    for kind in kinds:
        with contextlib.suppress(ValueError):
            fitting.append(validate_stream_kind(kind, market))
    return fitting or list(kinds)


def stream_names(symbols: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Binance stream names (lowercase symbol) in a stable order: by symbol, then kind;
    each once, so no group ever holds a stream twice. An all-market kind
    (`!miniTicker@arr`) is a stream of its own, named once."""
    names = [_stream_name(symbol, kind) for symbol in symbols for kind in kinds]
    return list(dict.fromkeys(names))


def _stream_name(symbol: str, kind: str) -> str:
    if kind.startswith("!"):
        return kind
    return pair_stream_name(symbol, kind) if is_pair_kind(kind) else f"{symbol.lower()}@{kind}"


def split_unsubscribe(names: object, market: str) -> tuple[list[str], list[str]]:
    """What `unsubscribe` was given, as (symbols, all-market streams such as
    `!miniTicker@arr`): both can be named in one list; the symbols are checked and
    normalized as subscribe's are."""
    if not isinstance(names, list):
        return normalize_symbols(names), []  # raises, naming what was wrong
    all_market = market_named(market).all_market_streams
    market_wide = [n for n in names if n in all_market]
    named = [n for n in names if n not in market_wide]
    return (normalize_symbols(named) if named or not market_wide else []), market_wide


def place_streams(
    groups: Sequence[Group], streams: Sequence[str], max_per_group: int, market: str = SPOT
) -> tuple[list[Group], list[Group]]:
    """Put streams into the groups with room first, then into new groups: (grown, new).

    Each symbol's streams go, together, to the first group they fit in, so the groups
    fill up one after the other and a group is only started when the others are full.
    `groups` and `streams` are of one market (`market`) and one path.
    """
    slots = [list(group.streams) for group in groups]
    for chunk in _by_symbol(streams, max_per_group):
        target = next((slot for slot in slots if len(slot) + len(chunk) <= max_per_group), None)
        if target is None:
            target = []
            slots.append(target)
        target.extend(chunk)
    grown = [
        Group(g.id, tuple(slot), g.market)
        for g, slot in zip(groups, slots[: len(groups)], strict=True)
        if len(slot) != len(g.streams)
    ]
    taken = {g.id for g in groups}
    new = []
    for slot in slots[len(groups) :]:
        new.append(Group(_unused_id(slot, taken, market), tuple(slot), market))
        taken.add(new[-1].id)
    return grown, new


def _by_symbol(streams: Sequence[str], max_per_group: int) -> list[list[str]]:
    """The streams of each symbol, in order, cut to pieces that fit in one group."""
    per_symbol: dict[str, list[str]] = {}
    for stream in streams:
        per_symbol.setdefault(stream.split("@", 1)[0], []).append(stream)
    return [chunk[i : i + max_per_group] for chunk in per_symbol.values() for i in range(0, len(chunk), max_per_group)]


def _unused_id(streams: Sequence[str], taken: set[str], market: str) -> str:
    """group_id(streams), unless a living group that started with them still has that id."""
    gid, salt = group_id(streams, market), 0
    while gid in taken:
        salt += 1
        gid = group_id([*streams, f"#{salt}"], market)
    return gid


class StreamProcesses:
    """How many processes the workers consuming `streams` have, each count reported
    with its worker's heartbeat (every 2 s) and expiring soon after the worker is gone.

    Every group holds one of these processes for as long as it records, so this is the
    most groups that can run. Read with one SCAN, where asking the workers
    (`inspect().stats()`) would wait out a broadcast timeout in every subscribe.
    """

    TTL_SECONDS = 10

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    def report(self, worker: str, processes: int) -> None:
        self.client.set(self.keys.stream_processes(worker), processes, ex=self.TTL_SECONDS)

    def forget(self, worker: str) -> None:
        self.client.delete(self.keys.stream_processes(worker))

    def total(self) -> int | None:
        """The processes of all streams workers; None when none reported (heartbeats off)."""
        names = list(self.client.scan_iter(match=self.keys.stream_processes("*"), count=1000))
        counts = [int(value) for value in self.client.mget(names) if value is not None] if names else []
        return sum(counts) if counts else None


SUBSCRIPTIONS_LOCK_SECONDS = 30


class GroupRegistry:
    """The wanted groups, their stop flags and their status records in Redis."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self._set_status_if_holder = client.register_script(_SET_STATUS_IF_HOLDER)

    def changing(self) -> Lock:
        """The lock held while groups are placed, shrunk or stopped (subscribe,
        unsubscribe, the listing check), so that two changes never interleave."""
        timeout = SUBSCRIPTIONS_LOCK_SECONDS
        return self.client.lock(self.keys.subscriptions_lock, timeout=timeout, blocking_timeout=timeout)

    def wanted(self) -> dict[str, Group]:
        raw = self.client.hgetall(self.keys.groups)
        return {as_text(gid): Group.from_json(value) for gid, value in raw.items()}

    def get(self, gid: str) -> Group | None:
        value = self.client.hget(self.keys.groups, gid)
        return Group.from_json(value) if value is not None else None

    def want(self, group: Group) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.groups, group.id, group.to_json())
            pipe.delete(self.keys.stop(group.id))
            pipe.execute()

    def place(self, streams: Sequence[str], max_per_group: int, market: str = SPOT) -> tuple[list[Group], list[Group]]:
        """Add `market`'s streams not yet recorded to its wanted groups with room (their
        running tasks subscribe them within a second) and to new wanted groups: (grown,
        new). Each stream joins a group of its path only. The caller holds the
        subscriptions lock and starts the new groups."""
        wanted = {gid: group for gid, group in self.wanted().items() if group.market == market}
        covered = self.covered_streams(wanted)
        by_path: dict[str, list[str]] = {}
        for stream in streams:
            if stream not in covered:
                by_path.setdefault(market_named(market).stream_path(stream), []).append(stream)
        grown, new = [], []
        for path, path_streams in by_path.items():
            groups = sorted((g for g in wanted.values() if g.path == path), key=lambda g: g.id)
            path_grown, path_new = place_streams(groups, path_streams, max_per_group, market)
            grown += path_grown
            new += path_new
        for group in (*grown, *new):
            self.want(group)
        return grown, new

    def subscribe_market(self, subscription: MarketSubscription) -> None:
        """Keep `subscription` (one per market; a new one replaces the market's old one)."""
        self.client.hset(self.keys.market_subscriptions, subscription.market, subscription.to_json())

    def market_subscriptions(self) -> dict[str, MarketSubscription]:
        """The market subscriptions by market."""
        raw = self.client.hgetall(self.keys.market_subscriptions)
        return {as_text(market): MarketSubscription.from_json(value) for market, value in raw.items()}

    def groups_recording(self, streams: Sequence[str], market: str) -> list[str]:
        """The ids of `market`'s wanted groups that record any of `streams`, sorted."""
        asked = set(streams)
        return sorted(gid for gid, g in self.wanted().items() if g.market == market and asked & set(g.streams))

    def contracts(self, market: str) -> list[str]:
        """The symbols subscribed on `market`: not its all-market streams, nor the pairs
        its pair kinds are named by (a pair has no status or open interest)."""
        return sorted(
            {
                stream_subject(stream)
                for group in self.wanted().values()
                if group.market == market
                for stream in group.streams
                if not stream.startswith("!") and stream_kind(stream) not in PAIR_KINDS
            }
        )

    def covered_streams(self, wanted: Mapping[str, Group] | None = None) -> set[str]:
        """Every stream some wanted group (of `wanted`, default: all) records."""
        groups = self.wanted() if wanted is None else wanted
        return {stream for group in groups.values() for stream in group.streams}

    def remove_symbols(
        self, symbols: Sequence[str], streams: Sequence[str] = (), market: str = SPOT
    ) -> tuple[list[str], list[str]]:
        """Take the symbols' streams, and the named `streams` (all-market ones such as
        `!miniTicker@arr`), out of `market`'s groups: (stopped, shrunk) group ids.

        A group that keeps other streams stays, and its running task unsubscribes the
        removed ones on the open connection; a group left empty is stopped.
        """
        upper = {symbol.upper() for symbol in symbols}
        named = set(streams)
        stopped, shrunk = [], []
        for group in self.wanted().values():
            if group.market != market:
                continue
            keep = tuple(s for s in group.streams if stream_subject(s) not in upper and s not in named)
            if len(keep) == len(group.streams):
                continue
            if keep:
                self.want(Group(group.id, keep, group.market))
                shrunk.append(group.id)
            else:
                self.unwant(group.id)
                stopped.append(group.id)
        return stopped, shrunk

    def remove_market(self, market: str) -> list[str]:
        """Forget `market`'s market subscription and stop every group of `market`: the ids stopped."""
        self.client.hdel(self.keys.market_subscriptions, market)
        stopped = sorted(gid for gid, group in self.wanted().items() if group.market == market)
        for gid in stopped:
            self.unwant(gid)
        return stopped

    def note_waiting(self, processes: int | None, new_groups: Sequence[Group]) -> dict[str, Any]:
        """Name the new groups that find no free streams process, in their status (for
        `status`) and in what is returned (`waiting`, `warning`); {} when all fit.

        Unknown capacity (no worker reported one) warns of nothing: `status` still names
        a group that does not start.
        """
        excess = len(self.wanted()) - processes if processes is not None else 0
        if excess <= 0 or not new_groups:
            return {}
        waiting = list(new_groups[-excess:])
        reason = (
            f"no free streams process: all {processes} record other groups; {MORE_STREAM_PROCESSES}; "
            "it starts when one is free"
        )
        for group in waiting:
            self.set_status(group.id, state="waiting", last_error=reason)
        return {"waiting": [g.id for g in waiting], "warning": reason}

    def unwant(self, gid: str) -> None:
        """Forget the group and raise its stop flag; its running task exits soon after."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.groups, gid)
            pipe.set(self.keys.stop(gid), 1)
            pipe.execute()

    def is_stopped(self, gid: str) -> bool:
        return bool(self.client.exists(self.keys.stop(gid)))

    def has_live_lease(self, gid: str) -> bool:
        return bool(self.client.exists(self.keys.lease(gid)))

    def status(self, gid: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.status(gid))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def set_status_if_holder(self, gid: str, lease_key: str, token: str, **fields: object) -> bool:
        """Set status fields only while `token` holds the group's lease, in one step: a
        copy that lost its lease must not report `stopped` over the live one."""
        pairs = [str(part) for item in fields.items() for part in item]
        return bool(self._set_status_if_holder(keys=[self.keys.status(gid), lease_key], args=[token, *pairs]))

    def set_status(self, gid: str, **fields: object) -> None:
        """For a group no task holds yet (one waiting for a streams process)."""
        self.client.hset(self.keys.status(gid), mapping={k: str(v) for k, v in fields.items()})
