"""Deterministic order books: every level of a book is a pure function of the update id.

Nothing is stored, so any past book can be recomputed on demand, identically in every
process and after every restart (like trades, books count from the market's epoch).

The model, per symbol:

- Prices lie on a fixed grid of `N` levels, integer multiples of a decimal tick (about
  1 bp of the base price), wide enough for the mid's whole swing plus `DEPTH` levels
  on either side.
- Update id `v` sets the quantity of one grid level, `slot(v mod N)`, to a hashed
  value that is "0" one time in eight (the level disappears until its next update).
  `slot` is a fixed permutation, so every level is updated exactly once every `N`
  updates and the last update of a level at or before `u` is found in O(1).
- The mid index `j(u)` follows the smooth part of the trade price. Levels at or below
  it are bids, levels above it asks, so the book is never crossed; as the mid moves,
  levels leave one side and appear on the other.
- Trade number `n` comes with `UPDATES_PER_TRADE` update ids, `K*n+1 .. K*n+K`, all at
  the trade's time; the book's id at a time is therefore `K * (last trade number + 1)`.

A diff between two ids only needs the levels updated in between plus those the mid
crossed, so a depth event costs O(updates + crossed levels), not O(book).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

UPDATES_PER_TRADE = 3
DEPTH = 500  # levels beyond the mid's extreme positions, on each side
SWING = 0.02  # the mid's relative amplitude (the smooth price wave of the market)
MAX_LEVELS = 5000  # Binance's most levels per side in a snapshot
_EMPTY_ONE_IN = 8
_MAX_LOTS = 50_000

PriceLevel = tuple[str, str]  # [price, qty] as Binance's decimal strings


@dataclass(frozen=True, slots=True)
class BookView:
    """One side pair of a book at `update_id`, best first (bids high->low, asks low->high)."""

    update_id: int
    bids: list[PriceLevel]
    asks: list[PriceLevel]


@dataclass(frozen=True, slots=True)
class BookDiff:
    """What changed between update ids `first - 1` and `last`: absolute quantities,
    "0" for a removed level, as in a depthUpdate event."""

    first: int
    last: int
    bids: list[PriceLevel]
    asks: list[PriceLevel]


class OrderBook:
    """The book of one symbol. `mid_price(n)` is the smooth price at trade number n."""

    def __init__(self, seed: int, base_price: float, mid_price: Callable[[int], float]) -> None:
        self._seed = seed ^ 0x0B00C
        self._mid_price = mid_price
        self._tick_exp = max(-8, math.floor(math.log10(base_price)) - 4)
        self._lot_exp = max(-8, math.floor(math.log10(10.0 / base_price)))
        self._tick = 10.0**self._tick_exp
        self.low = math.floor(base_price * (1 - SWING) / self._tick) - DEPTH
        high = math.floor(base_price * (1 + SWING) / self._tick) + DEPTH + 1
        self.size = high - self.low + 1
        self._stride = _coprime_near(self.size, int(self.size * 0.618))
        self._inverse = pow(self._stride, -1, self.size)

    # -- the model --------------------------------------------------------------------

    def mid_index(self, u: int) -> int:
        """Grid level (absolute price index) of the highest possible bid at update u."""
        n = (u - 1) // UPDATES_PER_TRADE
        return math.floor(self._mid_price(n) / self._tick)

    def _level_of(self, v: int) -> int:
        """Price index of the level that update v sets."""
        return self.low + (v % self.size) * self._stride % self.size

    def qty_lots(self, k: int, u: int) -> int:
        """Quantity (in lots) of price index k in the book at update u; 0 = no level."""
        position = (k - self.low) * self._inverse % self.size
        last_update = u - (u - position) % self.size
        h = zlib.crc32(last_update.to_bytes(8, "little", signed=True), self._seed)
        return 0 if h % _EMPTY_ONE_IN == 0 else 1 + (h >> 3) % _MAX_LOTS

    def _level(self, k: int, lots: int) -> PriceLevel:
        return _decimal(k, self._tick_exp), _decimal(lots, self._lot_exp)

    # -- views --------------------------------------------------------------------------

    def top(self, u: int, limit: int) -> BookView:
        """The best `limit` levels of each side at update u (walks out from the mid)."""
        j = self.mid_index(u)
        return BookView(
            u,
            self._walk(u, range(j, self.low - 1, -1), limit),
            self._walk(u, range(j + 1, self.low + self.size), limit),
        )

    def full(self, u: int) -> BookView:
        """Every level of the book at update u."""
        return self.top(u, self.size)

    def _walk(self, u: int, indexes: Iterable[int], limit: int) -> list[PriceLevel]:
        levels: list[PriceLevel] = []
        for k in indexes:
            lots = self.qty_lots(k, u)
            if lots:
                levels.append(self._level(k, lots))
                if len(levels) == limit:
                    break
        return levels

    def diff(self, first: int, last: int) -> BookDiff:
        """Levels whose (side, qty) differ between the books at `first - 1` and `last`."""
        before, after = first - 1, last
        j_before, j_after = self.mid_index(before), self.mid_index(after)
        if last - before >= self.size:
            candidates: set[int] = set(range(self.low, self.low + self.size))
        else:
            candidates = {self._level_of(v) for v in range(first, last + 1)}
        candidates.update(range(min(j_before, j_after) + 1, max(j_before, j_after) + 1))
        bids: list[tuple[int, int]] = []
        asks: list[tuple[int, int]] = []
        for k in candidates:
            old_lots, new_lots = self.qty_lots(k, before), self.qty_lots(k, after)
            old_bid, new_bid = k <= j_before, k <= j_after
            if old_bid == new_bid:
                if old_lots != new_lots:
                    (bids if new_bid else asks).append((k, new_lots))
                continue
            if old_lots:  # leaves its old side
                (bids if old_bid else asks).append((k, 0))
            if new_lots:  # appears on its new side
                (bids if new_bid else asks).append((k, new_lots))
        bids.sort(reverse=True)
        asks.sort()
        return BookDiff(
            first,
            last,
            [self._level(k, lots) for k, lots in bids],
            [self._level(k, lots) for k, lots in asks],
        )


def _decimal(units: int, exponent: int) -> str:
    """units * 10**exponent with Binance's 8 decimals, exactly (no float rounding);
    exponent >= -8, as the book's tick and lot are.

    Integer arithmetic rather than Decimal: a depth diff formats every level it
    carries, and this runs for each (the market-load mode diffs thousands a second).
    """
    if exponent >= 0:
        return f"{units * 10**exponent}.00000000"
    whole, fraction = divmod(units, 10**-exponent)
    return f"{whole}.{fraction:0{-exponent}d}{_ZEROS[: _DECIMALS + exponent]}"


_DECIMALS = 8
_ZEROS = "0" * _DECIMALS


def _coprime_near(n: int, start: int) -> int:
    """The first number >= start that shares no factor with n (a permutation stride)."""
    stride = max(start, 1)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride
