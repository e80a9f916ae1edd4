"""The market-load mode's listing and its traffic plan: which symbols, and how busy each is.

Names: Binance's busiest spot symbols first, in roughly their order of trade count, then
generated ones (`<BASE>USDT`, `<BASE>BTC`, `<BASE>FDUSD`, ...), each generated base
listed against one to three quote assets with USDT first, as on Binance where most
bases trade against USDT and a minority also against BTC, FDUSD, USDC or BNB.

Rates: symbol number k (0 for the busiest) carries a share of the total proportional to
1 / (k + 1) ** s, a Zipf law over the symbol's rank, the usual model of activity by
rank when a few members of a population carry most of it (as the issue says of
Binance: a few symbols carry most of the traffic). A power law rather than, say, an
exponential decay because it has the long tail the recorder has to live with: with
s = 1.2 over 1,500 symbols the busiest symbol carries about 23 % of the messages, the
top 10 about 56 % ("well over half"), the top 100 about 81 %, and the thinnest symbols
still send a message every couple of seconds. That is the shape that matters for the
recorder: a few connections' streams are busy, most streams are quiet, and every one
of them still has to be subscribed, buffered and stored. `--market-load-exponent`
changes s (1.0 flattens it: the top 10 get about 37 %). The figures are this model's,
not a measurement of Binance.

Per symbol, its messages are split into kinds as on Binance: depth@100ms sends at most
one diff per 100 ms, so it takes a tenth of the symbol's messages up to 10 a second,
and the rest is shared equally by trade, aggTrade and bookTicker (one trade per
aggregate, as in the fake's model).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

REAL_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT",
    "ETHUSDT",
    "SOLUSDT",
    "BTCFDUSD",
    "XRPUSDT",
    "DOGEUSDT",
    "BNBUSDT",
    "ETHFDUSD",
    "PEPEUSDT",
    "SUIUSDT",
    "ADAUSDT",
    "TRXUSDT",
    "LINKUSDT",
    "BTCUSDC",
    "ETHBTC",
    "LTCUSDT",
    "AVAXUSDT",
    "DOTUSDT",
    "SHIBUSDT",
    "ETHUSDC",
)
"""Binance's busiest spot symbols, roughly in order of trade count."""
DEFAULT_EXPONENT = 1.2
DEFAULT_SYMBOLS = 1500
"""About what Binance spot lists as TRADING."""
KINDS: tuple[str, ...] = ("trade", "aggTrade", "bookTicker", "depth@100ms")
"""The streams the market-load mode sends, per symbol."""
DEPTH_SHARE = 0.1
DEPTH_MAX_PER_SECOND = 10.0  # one diff per 100 ms
_QUOTE_SETS: tuple[tuple[str, ...], ...] = (
    ("USDT", "BTC"),
    ("USDT",),
    ("USDT", "FDUSD", "USDC"),
    ("USDT",),
    ("USDT", "BNB"),
    ("USDT", "BTC", "FDUSD"),
    ("USDT",),
)
_CONSONANTS = "BCDFGHJKLMNPRSTVXZ"
_VOWELS = "AEIOU"


def market_symbols(count: int) -> tuple[str, ...]:
    """`count` distinct symbol names: the real busy ones first, then generated ones."""
    names = list(REAL_SYMBOLS[:count])
    taken = set(names)
    for name in _generated():
        if len(names) >= count:
            break
        if name not in taken:
            names.append(name)
            taken.add(name)
    return tuple(names)


def _generated() -> Iterator[str]:
    """`<BASE><QUOTE>` for generated bases (pronounceable, 3 to 5 letters)."""
    for number in itertools.count():
        base = _base_name(number)
        for quote in _QUOTE_SETS[number % len(_QUOTE_SETS)]:
            yield base + quote


def _base_name(number: int) -> str:
    """Consonant-vowel syllables spelling `number`, ending in a consonant: ZOK, BAMIR..."""
    letters = [_CONSONANTS[number % len(_CONSONANTS)]]
    number //= len(_CONSONANTS)
    while True:
        letters.append(_VOWELS[number % len(_VOWELS)])
        number //= len(_VOWELS)
        letters.append(_CONSONANTS[number % len(_CONSONANTS)])
        number //= len(_CONSONANTS)
        if not number:
            return "".join(reversed(letters))


def zipf_shares(count: int, exponent: float) -> list[float]:
    """Each rank's share of the total (they sum to 1): proportional to 1 / rank ** exponent."""
    weights = [1.0 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(weights)
    return [weight / total for weight in weights]


@dataclass(frozen=True)
class LoadPlan:
    """Messages per second of every (symbol, kind), by symbol rank: `rates[kind][k]`."""

    total: float
    exponent: float
    rates: dict[str, list[float]]

    @classmethod
    def build(cls, symbols: int, total: float, exponent: float = DEFAULT_EXPONENT) -> LoadPlan:
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for share in zipf_shares(symbols, exponent):
            symbol_rate = total * share
            depth = min(DEPTH_MAX_PER_SECOND, DEPTH_SHARE * symbol_rate)
            rates["depth@100ms"].append(depth)
            for kind in KINDS[:3]:
                rates[kind].append((symbol_rate - depth) / 3)
        return cls(total, exponent, rates)

    def top_share(self, symbols: int) -> float:
        """The share of all messages the busiest `symbols` symbols carry."""
        per_symbol = [sum(rates[k] for rates in self.rates.values()) for k in range(symbols)]
        return sum(per_symbol) / self.total if self.total else 0.0
