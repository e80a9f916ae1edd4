"""The deterministic market: every trade, kline and ticker is a pure function of time.

Nothing is stored. Trade number n of a symbol has a fixed time (from the shared
`TradeClock`, counted from the market's epoch) and a price, quantity and side drawn
from a CRC32 of (symbol, n), so any history can be recomputed on demand, identically
in every process: REST pages and websocket events agree on the same ids without
sharing state, and a fake restarted later continues the same market with larger ids.
Trade id = `(symbol position + 1) * 1,000,000 + n` (aggregate ids use 500,000): per
symbol, ids grow by exactly 1; across symbols the ranges may overlap, as on Binance.
Order books (`orderbook.OrderBook`) follow the smooth part of the price; bookTicker
and the 24 h ticker's best bid/ask are the top of that book.

Window statistics (klines, 24 h tickers, the 5 min average price) are exact for
open, close, first/last id and count. High, low and the volumes come from at most
~`MAX_SAMPLES` sampled trades (every k-th trade number plus the first and last), so a
one-day window costs the same as a one-minute one. Volumes are the sampled sums
scaled by count / samples; with few trades every trade is sampled and all values
are exact.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

from fake_binance import intervals
from fake_binance.orderbook import UPDATES_PER_TRADE, BookView, OrderBook
from fake_binance.tradeclock import TradeClock

MAX_SAMPLES = 60
BLOCK_TRADE_EVERY = 50
_BLOCK_TRADE_SIZE = 40.0
_TRADE_ID_STRIDE = 1_000_000
_AGG_ID_STRIDE = 500_000
_BASE_PRICES = {
    "BTCUSDT": 60000.0,
    "ETHUSDT": 3000.0,
    "BNBUSDT": 600.0,
    "SOLUSDT": 150.0,
    "XRPUSDT": 0.6,
    "ADAUSDT": 0.45,
    "DOGEUSDT": 0.15,
    "LTCUSDT": 80.0,
    "TRXUSDT": 0.12,
    "DOTUSDT": 7.0,
}


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade; `agg_id` is its aggregate trade (one trade per aggregate here)."""

    id: int
    agg_id: int
    time: int
    price: float
    qty: float
    buyer_is_maker: bool


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Statistics of the trades whose time lies in one closed time range."""

    first_id: int  # -1 when the window holds no trade (as Binance reports it)
    last_id: int
    count: int
    open: float
    high: float
    low: float
    close: float
    prev_close: float  # price of the last trade before the window
    volume: float
    quote_volume: float
    taker_buy_volume: float
    taker_buy_quote_volume: float
    last_time: int  # time of the last trade at or before the window's end
    last_qty: float


@dataclass(frozen=True, slots=True)
class Kline:
    open_ms: int
    close_ms: int
    closed: bool
    stats: WindowStats


@dataclass(frozen=True, slots=True)
class Book:
    """Best bid and ask (decimal strings) of the order book at `update_id`."""

    update_id: int
    bid: str
    bid_qty: str
    ask: str
    ask_qty: str


@dataclass(frozen=True, slots=True)
class BlockTrade:
    """A large off-book trade, every `BLOCK_TRADE_EVERY`-th trade number."""

    id: int
    time: int
    price: float
    qty: float
    buyer_is_maker: bool


class UnknownSymbol(KeyError):
    """Raised for a symbol the fake does not list."""


class Market:
    """Trades and statistics of every listed symbol, computed on demand."""

    def __init__(self, symbols: tuple[str, ...], clock: TradeClock) -> None:
        self.symbols = symbols
        self.clock = clock
        self._index = {s: i for i, s in enumerate(symbols)}
        self._seeds = [zlib.crc32(s.encode()) for s in symbols]
        self._bases = [_base_price(s, seed) for s, seed in zip(symbols, self._seeds, strict=True)]
        # Samples repeat from one ticker second to the next; trades do not.
        self._sample = functools.lru_cache(maxsize=1 << 18)(self._values)
        self._books: dict[int, OrderBook] = {}

    def index(self, symbol: str) -> int:
        """Position of an uppercase symbol; raises UnknownSymbol."""
        try:
            return self._index[symbol]
        except KeyError:
            raise UnknownSymbol(symbol) from None

    def seed(self, i: int) -> int:
        """The hash seed of symbol i: everything random about it derives from this."""
        return self._seeds[i]

    def base_price(self, i: int) -> float:
        return self._bases[i]

    def trade_id_base(self, i: int) -> int:
        return _TRADE_ID_STRIDE * (i + 1)

    def agg_id_base(self, i: int) -> int:
        return _AGG_ID_STRIDE * (i + 1)

    def last_n(self, now_ms: int) -> int:
        """Number of the latest trade that exists at now_ms (-1: none yet)."""
        return self.clock.last_at(now_ms)

    def trade(self, i: int, n: int) -> Trade:
        price, qty, maker = self._values(i, n)
        return Trade(
            id=self.trade_id_base(i) + n,
            agg_id=self.agg_id_base(i) + n,
            time=self.clock.time_of(n),
            price=price,
            qty=qty,
            buyer_is_maker=maker,
        )

    def block_trade(self, i: int, n: int) -> BlockTrade | None:
        """The block trade that happens with trade number n, if any (ids count from 0)."""
        if n % BLOCK_TRADE_EVERY != self._seeds[i] % BLOCK_TRADE_EVERY:
            return None
        t = self.trade(i, n)
        return BlockTrade(
            id=n // BLOCK_TRADE_EVERY,
            time=t.time,
            price=t.price,
            qty=round(t.qty * _BLOCK_TRADE_SIZE, 8),
            buyer_is_maker=t.buyer_is_maker,
        )

    # -- order books ----------------------------------------------------------------

    def order_book(self, i: int) -> OrderBook:
        """The deterministic book model of symbol i (built on first use)."""
        book = self._books.get(i)
        if book is None:
            book = self._books[i] = OrderBook(self._seeds[i], self._bases[i], functools.partial(self.mid_price, i))
        return book

    def book_id_at(self, t_ms: int) -> int:
        """Update id of every symbol's book at t_ms: the updates of the trades so far."""
        return UPDATES_PER_TRADE * (self.clock.last_at(t_ms) + 1)

    def book_time(self, update_id: int) -> int:
        """Transaction time of a book update id: that of the trade it came with."""
        return self.clock.time_of(max(update_id - 1, 0) // UPDATES_PER_TRADE)

    def book_view(self, i: int, update_id: int, limit: int) -> BookView:
        return self.order_book(i).top(update_id, limit)

    def book(self, i: int, trade: Trade) -> Book:
        """Best bid/ask once the book updates that come with `trade` are applied."""
        n = trade.id - self.trade_id_base(i)
        top = self.book_view(i, UPDATES_PER_TRADE * (n + 1), 1)
        (bid, bid_qty), (ask, ask_qty) = top.bids[0], top.asks[0]
        return Book(top.update_id, bid, bid_qty, ask, ask_qty)

    def mid_price(self, i: int, n: int) -> float:
        """The smooth price wave at trade number n: the book's mid, trades' centre."""
        phase = self._seeds[i] % 10_000
        return self._bases[i] * (1.0 + 0.02 * math.sin((n + phase) / 700.0))

    def window(self, i: int, start_ms: int, end_ms: int, step: int = 0) -> WindowStats:
        """Stats of trades with start_ms <= time <= end_ms.

        `step` picks the sampled trade numbers (multiples of it); 0 derives it from
        the window's own count. Klines pass the step of their whole window so that
        the samples of an open kline never change, only grow.
        """
        first = self.clock.first_at_or_after(start_ms)
        last = self.clock.last_at(end_ms)
        count = max(0, last - first + 1)
        if count == 0:
            return self._empty_window(i, first)
        step = step or _sample_step(count)
        numbers = sorted({first, last, *range(-(-first // step) * step, last + 1, step)})
        samples = [self._sample(i, n) for n in numbers]
        prices = [p for p, _, _ in samples]
        scale = count / len(samples)
        volume = sum(q for _, q, _ in samples)
        quote = sum(p * q for p, q, _ in samples)
        taker_buys = [(p, q) for p, q, maker in samples if not maker]
        return WindowStats(
            first_id=self.trade_id_base(i) + first,
            last_id=self.trade_id_base(i) + last,
            count=count,
            open=prices[0],
            high=max(prices),
            low=min(prices),
            close=prices[-1],
            prev_close=self._sample(i, first - 1)[0] if first > 0 else prices[0],
            volume=volume * scale,
            quote_volume=quote * scale,
            taker_buy_volume=sum(q for _, q in taker_buys) * scale,
            taker_buy_quote_volume=sum(p * q for p, q in taker_buys) * scale,
            last_time=self.clock.time_of(last),
            last_qty=samples[-1][1],
        )

    def kline(self, i: int, interval: str, open_ms: int, now_ms: int) -> Kline:
        """The kline opening at open_ms as it stands at now_ms (open if not over)."""
        close_ms = intervals.next_start(interval, open_ms) - 1
        full_count = self.clock.last_at(close_ms) - self.clock.last_at(open_ms - 1)
        stats = self.window(i, open_ms, min(close_ms, now_ms), _sample_step(full_count))
        return Kline(open_ms, close_ms, close_ms < now_ms, stats)

    def _empty_window(self, i: int, first: int) -> WindowStats:
        """A window without trades: all prices are the previous close, volumes 0."""
        before = max(first - 1, 0)
        price, qty, _ = self._sample(i, before)
        return WindowStats(
            first_id=-1,
            last_id=-1,
            count=0,
            open=price,
            high=price,
            low=price,
            close=price,
            prev_close=price,
            volume=0.0,
            quote_volume=0.0,
            taker_buy_volume=0.0,
            taker_buy_quote_volume=0.0,
            last_time=self.clock.time_of(before),
            last_qty=qty,
        )

    def _values(self, i: int, n: int) -> tuple[float, float, bool]:
        """(price, qty, buyer_is_maker) of trade n: a slow wave plus hash noise."""
        h = zlib.crc32(n.to_bytes(8, "little", signed=True), self._seeds[i])
        base = self._bases[i]
        noise = (h & 0xFFFF) / 0x7FFF - 1.0
        price = self.mid_price(i, n) + base * 0.002 * noise
        qty = (1000.0 / base) * (0.1 + 9.9 * ((h >> 16) & 0x7FFF) / 0x7FFF)
        return round(price, 8), round(qty, 8), bool(h >> 31)


def decimal_str(x: float) -> str:
    """Binance's decimal-string form of a price or quantity (8 decimals)."""
    return f"{x:.8f}"


def _base_price(symbol: str, seed: int) -> float:
    """Known spot symbols' prices; a futures contract takes its pair's (`BTCUSD_PERP`
    and `BTCUSDT_261225` trade near `BTCUSDT`); others a price of their own."""
    pair = symbol.partition("_")[0]
    for name in (pair, pair + "T"):
        if name in _BASE_PRICES:
            return _BASE_PRICES[name]
    return 0.5 + (seed % 20_000) / 100.0


def _sample_step(count: int) -> int:
    return max(1, -(-count // MAX_SAMPLES))
