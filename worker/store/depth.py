"""Order-book payloads as rows: diff-depth events, partial-depth tops and REST snapshots.

Price levels are stored as one BLOB per side, packed little-endian float64 pairs
(price, quantity, price, quantity, ...), 16 bytes a level. Why (measured by
`python -m bench` depth part, see docs/order-books.md):

- a row per level would multiply the rows (a depth@100ms event changes about 20
  levels) and with them the key index and the insert time;
- the levels' JSON text (`[["30000.01000000","0.12300000"],...]` as Binance sends it)
  takes 1.7 times the bytes (760 against 449 an event of 20 levels, with the table's
  indexes), and turning it back into numbers takes twice as long when a book is rebuilt
  (0.48 against 0.26 s for an hour of events): a JSON parse and a float() per number,
  where unpacking is one `struct` call per side;
- float64 holds Binance's decimal strings exactly (at most 15 significant digits), as
  every other price column does.
"""

from __future__ import annotations

import struct
from typing import Any

Level = tuple[float, float]

_LEVEL_BYTES = 16


class BadLevels(ValueError):
    """Levels that are not a list of [price, quantity] decimal strings."""


def pack_levels(levels: Any) -> bytes:
    """[["0.0024", "10"], ...] -> packed float64 pairs; raises BadLevels."""
    if type(levels) is not list:
        raise BadLevels(f"levels {levels!r} are not a list")
    flat: list[float] = []
    try:
        for price, qty in levels:
            flat.append(float(price))
            flat.append(float(qty))
    except (TypeError, ValueError):
        raise BadLevels(f"levels {str(levels)[:80]} are not [price, quantity] pairs of decimal strings") from None
    return struct.pack(f"<{len(flat)}d", *flat)


def unpack_levels(packed: bytes) -> list[Level]:
    """The (price, quantity) pairs of `pack_levels`, in the order they were sent."""
    flat = struct.unpack(f"<{len(packed) // 8}d", packed)
    return list(zip(flat[::2], flat[1::2], strict=True))


def level_count(packed: bytes) -> int:
    return len(packed) // _LEVEL_BYTES


def snapshot_row(symbol: str, snapshot: dict[str, Any], received_at: int) -> tuple[Any, ...]:
    """A `GET /api/v3/depth` answer as a `depth_snapshots` row."""
    return (
        symbol,
        int(snapshot["lastUpdateId"]),
        pack_levels(snapshot["bids"]),
        pack_levels(snapshot["asks"]),
        received_at,
        None,  # received_seq: not a websocket frame
    )
