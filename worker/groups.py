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
from worker.streams import validate_stream_kind

# Set status fields only if the lease (KEYS[2]) still holds this token (ARGV[1]).
_SET_STATUS_IF_HOLDER = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

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
        return sorted({stream.split("@", 1)[0].upper() for stream in self.streams})

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "streams": list(self.streams)})

    @classmethod
    def from_json(cls, text: str | bytes) -> Group:
        data = json.loads(text)
        return cls(id=data["id"], streams=tuple(data["streams"]))


def group_id(streams: Iterable[str]) -> str:
    digest = hashlib.sha1("/".join(sorted(streams)).encode()).hexdigest()
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


def normalize_stream_kinds(kinds: object) -> list[str]:
    """Check a caller's stream kinds, in their canonical spelling, duplicates removed."""
    result: list[str] = []
    for position, raw in enumerate(_list_of_strings(kinds, "streams", "['trade', 'kline_1m']")):
        try:
            kind = validate_stream_kind(raw)
        except ValueError as error:
            raise InvalidSubscription(f"streams[{position}]: {error}") from None
        if kind not in result:
            result.append(kind)
    if not result:
        raise InvalidSubscription("no stream kinds given: pass a list such as ['trade'], or none for DEFAULT_STREAMS")
    return result


def stream_names(symbols: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Binance stream names (lowercase symbol) in a stable order: by symbol, then kind;
    each once, so no group ever holds a stream twice."""
    return list(dict.fromkeys(f"{symbol.lower()}@{kind}" for symbol in symbols for kind in kinds))


def plan_groups(streams: Sequence[str], max_per_group: int) -> list[Group]:
    """Cut streams into groups; a symbol's streams stay together whenever they fit."""
    chunks = [streams[i : i + max_per_group] for i in range(0, len(streams), max_per_group)]
    return [Group(id=group_id(chunk), streams=tuple(chunk)) for chunk in chunks]


class GroupRegistry:
    """The wanted groups, their stop flags and their status records in Redis."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self._set_status_if_holder = client.register_script(_SET_STATUS_IF_HOLDER)

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

    def set_status_if_holder(self, gid: str, lease_key: str, token: str, **fields: object) -> bool:
        """Set status fields only while `token` holds the group's lease, in one step: a
        copy that lost its lease must not report `stopped` over the live one."""
        pairs = [str(part) for item in fields.items() for part in item]
        return bool(self._set_status_if_holder(keys=[self.keys.status(gid), lease_key], args=[token, *pairs]))

    def covered_streams(self) -> set[str]:
        return {stream for group in self.wanted().values() for stream in group.streams}
