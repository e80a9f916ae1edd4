"""Symbol groups: which streams share one websocket connection, and which are wanted.

A group is a set of at most `max_streams_per_connection` stream names. Its id is a
hash of the sorted names, so subscribing the same set twice names the same group and
cannot open a second connection. The wanted groups live in Redis, where the
supervisor, the `status` command and every worker can see them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from worker.keys import RedisKeys, as_text

# Binance's own pattern for the `symbol` parameter.
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9\-_.]{1,20}$")


class InvalidSubscription(ValueError):
    """A symbol or stream kind that cannot be subscribed; the message says why."""


@dataclass(frozen=True)
class Group:
    id: str
    streams: tuple[str, ...]

    @property
    def symbols(self) -> list[str]:
        """The symbols of its streams; an all-market stream (`!miniTicker@arr`) by its name."""
        return sorted(
            {stream if stream.startswith("!") else stream.split("@", 1)[0].upper() for stream in self.streams}
        )

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "streams": list(self.streams)})

    @classmethod
    def from_json(cls, text: str | bytes) -> Group:
        data = json.loads(text)
        return cls(id=data["id"], streams=tuple(data["streams"]))


def group_id(streams: Iterable[str]) -> str:
    digest = hashlib.sha1("/".join(sorted(streams)).encode()).hexdigest()
    return f"g{digest[:12]}"


def normalize_symbols(symbols: Sequence[str] | str) -> list[str]:
    """Upper-case, de-duplicate and check the format of the symbols a caller gave.

    A bare string is refused rather than iterated character by character, the usual
    slip of `subscribe.delay("BTCUSDT")`.
    """
    if isinstance(symbols, str):
        raise InvalidSubscription(f"symbols must be a list, got the string {symbols!r}: call subscribe([{symbols!r}])")
    result: list[str] = []
    for raw in symbols:
        symbol = str(raw).strip().upper()
        if not SYMBOL_PATTERN.match(symbol):
            raise InvalidSubscription(f"{raw!r} is not a Binance symbol: use letters and digits such as 'BTCUSDT'")
        if symbol not in result:
            result.append(symbol)
    if not result:
        raise InvalidSubscription("no symbols given: pass a list such as ['BTCUSDT']")
    return result


def stream_names(symbols: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Binance stream names (lowercase symbol) in a stable order: by symbol, then kind.

    An all-market kind (`!miniTicker@arr`) is a stream of its own, named once."""
    names = [kind if kind.startswith("!") else f"{symbol.lower()}@{kind}" for symbol in symbols for kind in kinds]
    return list(dict.fromkeys(names))


def plan_groups(streams: Sequence[str], max_per_group: int) -> list[Group]:
    """Cut streams into groups; a symbol's streams stay together whenever they fit."""
    chunks = [streams[i : i + max_per_group] for i in range(0, len(streams), max_per_group)]
    return [Group(id=group_id(chunk), streams=tuple(chunk)) for chunk in chunks]


class GroupRegistry:
    """The wanted groups, their stop flags and their status records in Redis."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

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

    def set_status(self, gid: str, **fields: object) -> None:
        self.client.hset(self.keys.status(gid), mapping={k: str(v) for k, v in fields.items()})

    def covered_streams(self) -> set[str]:
        return {stream for group in self.wanted().values() for stream in group.streams}
