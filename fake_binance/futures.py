"""The futures markets (USDⓈ-M, COIN-M): stream names, routes, payloads and prices.

`FuturesVenue` is the `streams.Venue` of one futures market. Both share one engine
(`market.Market` over every contract of both, see `contracts`), so the all-market
arrays (`!markPrice@arr`, `!ticker@arr`, `!miniTicker@arr`, `!forceOrder@arr`) carry
both markets on either host, each event with its `st`, as Binance's do since 2026-06-30.

USDⓈ-M routes streams by path: `/public` carries the books (`@depth*`) and
`@bookTicker`, `/market` the rest. A stream asked for on a path that does not carry
it, or a `/market` kind on an unrouted path (`/ws`, `/stream`: those carry what
`/public` does), is acknowledged and then never delivers, as on Binance. The
undocumented `<s>@trade` is served on both routes: sources disagree on its path.
COIN-M has no routes: `/ws` and `/stream` carry everything.

Update ids are engine-wide, as on Binance: the model's book update v of contract i is
`v * contracts + i` on the wire, so a depth event's `U` is never the previous `u` + 1
and a client must chain `pu`. Prices: the mark price is the contract's mid; the index
is the pair's perpetual's mid 3 bp lower; the funding rate is a smooth wave around
0.01 % per funding time; liquidations happen in about one second in four per
contract, at most one a second, as Binance sends them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Set
from typing import Any

from fake_binance import intervals
from fake_binance.contracts import COINM, ONBOARD_MS, USDM, Contract, Lifecycle
from fake_binance.market import Kline, Market, Trade
from fake_binance.market import decimal_str as _d
from fake_binance.streams import (
    KLINE,
    SECOND_MS,
    TIMED,
    Event,
    InvalidStream,
    Moment,
    StreamSpec,
    agg_trade,
    depth_spec,
    encode,
    kline,
    listed_symbol,
    mini_ticker,
    split_stream,
    ticker,
    trade,
)

PUBLIC, MARKET = "public", "market"
PUBLIC_KINDS = frozenset({"depth", "partialDepth", "bookTicker"})
"""The kinds USDⓈ-M's `/public` path (and an unrouted path) carries; `/market` the rest."""
BOTH_ROUTES = frozenset({"trade"})
COINM_CONTRACT_USD = 100  # a COIN-M contract's face value (BTC's; others' are 10 on Binance)
SLOW_MS = 3000  # markPrice and indexPrice without @1s
INDEX_DISCOUNT = 0.0003
FUNDING_BASE = 0.0001
_DEPTH_KIND = re.compile(r"depth(5|10|20)?(?:@(100|250|500)ms)?")
_DEFAULT_DEPTH_MS = 250
_LIQUIDATION_ONE_IN = 4
_CONTRACT_TYPES = ("perpetual", "current_quarter", "next_quarter")
_KLINE_INTERVALS = frozenset(intervals.INTERVALS) - {"1s"}  # futures have no 1 s klines
_ALL_MARKET: dict[str, tuple[str, int]] = {
    "!markPrice@arr": ("markPrice@arr", SLOW_MS),
    "!markPrice@arr@1s": ("markPrice@arr", SECOND_MS),
    "!forceOrder@arr": ("forceOrder@arr", SECOND_MS),
    "!ticker@arr": ("ticker@arr", SECOND_MS),
    "!miniTicker@arr": ("miniTicker@arr", SECOND_MS),
}
CONTRACT_INFO_WINDOW_MS = 3000
"""`!contractInfo` (USDⓈ-M) is sent each second with the status changes of the last 3:
each change is sent up to three times with the same `E`, which a recorder keyed by
(symbol, event time) stores once, and none is lost to a late tick."""
_TIMED_KINDS = {
    "markPrice": SLOW_MS,
    "markPrice@1s": SECOND_MS,
    "forceOrder": SECOND_MS,
    "ticker": SECOND_MS,
    "miniTicker": SECOND_MS,
}
_PER_TRADE_KINDS = {USDM: frozenset({"aggTrade", "trade", "bookTicker"}), COINM: frozenset({"aggTrade", "bookTicker"})}
_SYMBOL_KLINES = {USDM: frozenset({"kline"}), COINM: frozenset({"kline", "markPriceKline"})}


class FuturesVenue:
    """One futures market of the shared engine; `market` is that engine's model."""

    def __init__(self, name: str, market: Market, contracts: tuple[Contract, ...], lifecycle: Lifecycle) -> None:
        self.name = name
        self.routed = name == USDM
        self._market = market
        self._contracts = contracts
        self._lifecycle = lifecycle
        self._mine = tuple(c for c in contracts if c.market == name)

    # -- listing ------------------------------------------------------------------

    @property
    def listed(self) -> Set[str]:
        return {c.symbol for c in self._mine if self._lifecycle.trading(c.symbol)}

    def knows(self, symbol: str, now: int) -> bool:
        return any(c.symbol == symbol for c in self._mine) and self._lifecycle.listed(symbol, now)

    def symbols(self, now: int) -> list[str]:
        return [c.symbol for c in self._mine if self._lifecycle.listed(c.symbol, now)]

    def contract(self, index: int) -> Contract:
        return self._contracts[index]

    def status(self, contract: Contract, now: int) -> str:
        return self._lifecycle.status(contract, now)

    def settle(self, symbol: str, now: int, delist_after_ms: int) -> Contract:
        """Settle one of this market's trading contracts (KeyError if it has none such)."""
        for contract in self._mine:
            if contract.symbol == symbol and self._lifecycle.trading(symbol):
                self._lifecycle.settle(contract, now, delist_after_ms)
                return contract
        raise KeyError(symbol)

    # -- stream names ---------------------------------------------------------------

    def parse_stream(self, name: str, route: str) -> StreamSpec:
        spec = self._parse(name)
        return spec if not self.routed or _carries(route, spec.kind) else dataclasses.replace(spec, silent=True)

    def _parse(self, name: str) -> StreamSpec:
        if name == "!contractInfo" and self.name == USDM:
            return StreamSpec(name, None, "contractInfo@arr", every_ms=SECOND_MS, category=TIMED)
        if name in _ALL_MARKET:
            kind, every_ms = _ALL_MARKET[name]
            return StreamSpec(name, None, kind, every_ms=every_ms, category=TIMED)
        part, kind = split_stream(name)
        if kind in _PER_TRADE_KINDS[self.name]:
            return StreamSpec(name, listed_symbol(part, self.listed), kind)
        if kind in _TIMED_KINDS:
            base = kind.partition("@")[0]
            return StreamSpec(name, listed_symbol(part, self.listed), base, every_ms=_TIMED_KINDS[kind], category=TIMED)
        if self.name == COINM and kind in ("indexPrice", "indexPrice@1s"):
            every_ms = SECOND_MS if kind.endswith("@1s") else SLOW_MS
            return StreamSpec(name, self._pair_contract(part), "indexPrice", every_ms=every_ms, category=TIMED)
        depth = _DEPTH_KIND.fullmatch(kind)
        if depth:
            levels, speed = depth.groups()
            return depth_spec(name, listed_symbol(part, self.listed), levels, int(speed or _DEFAULT_DEPTH_MS))
        family, _, interval = kind.partition("_")
        if interval in _KLINE_INTERVALS:
            if family in _SYMBOL_KLINES[self.name]:
                return StreamSpec(name, listed_symbol(part, self.listed), family, interval, category=KLINE)
            if family == "continuousKline":
                pair, contract_type = _pair_and_type(part)
                return StreamSpec(name, self._pair_contract(pair, contract_type), family, interval, category=KLINE)
            if family == "indexPriceKline" and self.name == COINM:
                return StreamSpec(name, self._pair_contract(part), family, interval, category=KLINE)
        raise InvalidStream(f"invalid stream name {name!r}")

    def _pair_contract(self, pair: str, contract_type: str = "perpetual") -> str | None:
        """The trading contract of a lowercase `pair` and contract type, if any."""
        for c in self._mine:
            if c.pair.lower() == pair and c.contract_type.lower() == contract_type and c.symbol in self.listed:
                return c.symbol
        return None

    # -- prices -------------------------------------------------------------------

    def mark_price(self, index: int, n: int) -> float:
        return self._market.mid_price(index, n)

    def index_price(self, index: int, n: int) -> float:
        """The pair's index: its perpetual's mid, a little below the marks."""
        pair = self._contracts[index].pair
        reference = next(i for i, c in enumerate(self._contracts) if c.pair == pair and c.perpetual)
        return self._market.mid_price(reference, n) * (1 - INDEX_DISCOUNT)

    def funding_rate(self, index: int, funding_time: int) -> float:
        phase = self._market.seed(index) % 1000
        return FUNDING_BASE * (1 + math.sin(funding_time / 86_400_000 + phase))

    def next_funding_time(self, contract: Contract, now: int) -> int:
        """0 for delivery contracts, which pay no funding (Binance sends `T` 0)."""
        if contract.funding_hours is None:
            return 0
        period = contract.funding_hours * 3_600_000
        return (now // period + 1) * period

    def open_interest(self, index: int, n: int) -> str:
        """Open interest in base asset (USDⓈ-M) or whole contracts (COIN-M)."""
        base = self._market.base_price(index)
        amount = 1e6 / base * (1 + 0.1 * math.sin(n / 3000 + self._market.seed(index) % 100))
        if self._contracts[index].market == COINM:
            return str(round(amount * base / COINM_CONTRACT_USD))
        return f"{amount:.3f}"

    def premium_index(self, index: int, now: int) -> dict[str, Any]:
        """A contract's mark price object (the markPriceUpdate fields, REST-named)."""
        c, n = self._contracts[index], max(self._market.last_n(now), 0)
        funding_time = self.next_funding_time(c, now)
        return {
            "symbol": c.symbol,
            **self._pair_field(c, "pair"),
            "markPrice": _d(self.mark_price(index, n)),
            "indexPrice": _d(self.index_price(index, n)),
            "estimatedSettlePrice": _d(self.index_price(index, n)),
            "lastFundingRate": _d(self.funding_rate(index, funding_time)) if funding_time else "",
            "interestRate": "0.00010000" if funding_time else "",
            "nextFundingTime": funding_time,
            "time": now,
        }

    def funding_history(self, index: int, funding_time: int) -> dict[str, Any]:
        n = max(self._market.last_n(funding_time), 0)
        return {
            "symbol": self._contracts[index].symbol,
            "fundingTime": funding_time,
            "fundingRate": _d(self.funding_rate(index, funding_time)),
            "markPrice": _d(self.mark_price(index, n)),
        }

    # -- payloads -----------------------------------------------------------------

    def _pair_field(self, c: Contract, name: str = "ps") -> dict[str, str]:
        """COIN-M payloads name the pair (`ps`)."""
        return {name: c.pair} if c.market == COINM else {}

    def _tagged(self, index: int, payload: dict[str, Any]) -> dict[str, Any]:
        """An all-market array's element: it says its market (`st`)."""
        return {**payload, "st": self._contracts[index].st}

    def trade_event(self, spec: StreamSpec, index: int, t: Trade, now: int) -> Event | None:
        symbol = spec.symbol or ""
        if spec.kind == "trade":
            event = trade(symbol, t, now)
            del event["M"]
            return encode({**event, "X": "MARKET"}), t.id
        if spec.kind == "aggTrade":
            event = agg_trade(symbol, t, now)
            del event["M"]
            if self.name == USDM:  # the quantity without RPI orders (all of it here)
                event["nq"] = event["q"]
            return encode(event), t.agg_id
        book = self._market.book(index, t)
        wire = self.wire_id(index, book.update_id)
        ps = self._pair_field(self._contracts[index])
        best = {"b": book.bid, "B": book.bid_qty, "a": book.ask, "A": book.ask_qty}
        return encode({"e": "bookTicker", "u": wire, "s": symbol, **ps, **best, "T": t.time, "E": now}), wire

    def kline_event(self, spec: StreamSpec, index: int, k: Kline, now: int) -> bytes:
        c, interval = self._contracts[index], spec.interval or ""
        if spec.kind == "kline":
            return encode(kline("kline", c.symbol, interval, k, now))
        if spec.kind == "continuousKline":
            event = kline("continuous_kline", c.symbol, interval, k, now)
            del event["s"], event["k"]["s"]
            return encode({**event, "ps": c.pair, "ct": c.contract_type})
        # Mark and index price klines: prices only; f and L are the first and last update times.
        price = self.mark_price if spec.kind == "markPriceKline" else self.index_price
        event = kline(spec.kind.removesuffix("Kline") + "_kline", c.symbol, interval, k, now)
        del event["s"]
        clock, last = self._market.clock, self._market.last_n(min(now, k.close_ms))
        numbers = range(max(clock.first_at_or_after(k.open_ms), 0), last + 1) or range(last, last + 1)
        prices = [price(index, n) for n in (numbers[0], numbers[len(numbers) // 2], numbers[-1])]
        event["k"].update(
            s=c.symbol if spec.kind == "markPriceKline" else "0",
            f=k.open_ms,
            L=min(now, k.close_ms),
            o=_d(prices[0]),
            c=_d(prices[-1]),
            h=_d(max(prices)),
            l=_d(min(prices)),
            v="0",
            n=0,
            q="0",
            V="0",
            Q="0",
        )
        return encode({**event, "ps": c.pair})

    def timed_events(self, spec: StreamSpec, index: int, moment: Moment) -> list[Event]:
        kind, now = spec.kind, moment.now
        if spec.all_market:
            return self._all_market_events(kind.removesuffix("@arr"), moment)
        if kind == "forceOrder":
            order = self._liquidation(index, now // 1000 - 1)
            return [] if order is None else [(encode(order), order["o"]["T"])]
        if kind == "indexPrice":
            pair = self._contracts[index].pair
            price = self.index_price(index, max(moment.last_n, 0))
            return [(encode({"e": "indexPriceUpdate", "E": now, "i": pair, "p": _d(price)}), None)]
        return [(encode(self._symbol_payload(kind, index, moment)), None)]

    def _symbol_payload(self, kind: str, index: int, moment: Moment) -> dict[str, Any]:
        """markPriceUpdate, 24hrTicker or 24hrMiniTicker of one contract."""
        c, now = self._contracts[index], moment.now
        ps = self._pair_field(c)
        if kind == "markPrice":
            n = max(moment.last_n, 0)
            funding_time = self.next_funding_time(c, now)
            rate = _d(self.funding_rate(index, funding_time)) if funding_time else ""
            index_price = _d(self.index_price(index, n))
            mark = {"p": _d(self.mark_price(index, n)), "i": index_price, "P": index_price, "r": rate}
            return {"e": "markPriceUpdate", "E": now, "s": c.symbol, **ps, **mark, "T": funding_time}
        stats = moment.stats(index, 86_400_000)
        event = ticker(c.symbol, stats, None, now) if kind == "ticker" else mini_ticker(c.symbol, stats, now)
        return {**event, **ps}

    def _all_market_events(self, kind: str, moment: Moment) -> list[Event]:
        """Every trading contract of both markets, each tagged with its market."""
        if kind == "contractInfo":
            return [(encode(event), None) for event in self._contract_changes(moment.now)]
        trading = [i for i, c in enumerate(self._contracts) if self._lifecycle.trading(c.symbol)]
        if kind == "forceOrder":  # one frame per liquidation, not an array
            second = moment.now // 1000 - 1
            orders = [(i, self._liquidation(i, second)) for i in trading]
            return [(encode(self._tagged(i, o)), o["o"]["T"]) for i, o in orders if o is not None]
        return [(encode([self._tagged(i, self._symbol_payload(kind, i, moment)) for i in trading]), None)]

    def _contract_changes(self, now: int) -> list[dict[str, Any]]:
        """contractInfo events of this market's status changes in the last
        CONTRACT_INFO_WINDOW_MS (the `settle` control's; the fake lists nothing new
        while it runs). No brackets (`bks`): Binance sends them only on some changes."""
        return [
            {
                "e": "contractInfo",
                "E": at,
                "s": c.symbol,
                "ps": c.pair,
                "ct": c.contract_type,
                "dt": c.delivery_ms,
                "ot": ONBOARD_MS,
                "cs": self.status(c, at),
            }  # fmt: skip
            for c in self._mine
            if now - CONTRACT_INFO_WINDOW_MS < (at := self._lifecycle.settled_at.get(c.symbol, 0)) <= now
        ]

    def _liquidation(self, index: int, second: int) -> dict[str, Any] | None:
        """The forced order of contract `index` in one second, if it had one."""
        h = zlib.crc32(second.to_bytes(8, "little", signed=True), self._market.seed(index))
        if h % _LIQUIDATION_ONE_IN:
            return None
        c = self._contracts[index]
        order_time = second * 1000 + (h >> 4) % 1000
        mid = self.mark_price(index, max(self._market.last_n(order_time), 0))
        sell = bool(h >> 31)
        qty = _d(round((1000.0 / mid) * (1 + (h >> 14) % 50), 3))
        price = _d(mid * (0.995 if sell else 1.005))
        order = {"s": c.symbol, **self._pair_field(c), "S": "SELL" if sell else "BUY", "o": "LIMIT", "f": "IOC"}
        fill = {"q": qty, "p": price, "ap": price, "X": "FILLED", "l": qty, "z": qty, "T": order_time}
        return {"e": "forceOrder", "E": order_time + 5, "o": {**order, **fill}}

    def book_event(self, spec: StreamSpec, index: int, previous: int, book_id: int, now: int) -> bytes:
        first = previous + 1
        if spec.kind == "partialDepth":  # sent even when nothing changed: then U = u = pu
            view = self._market.book_view(index, book_id, spec.levels)
            bids, asks, first = view.bids, view.asks, min(first, book_id)
        else:
            diff = self._market.order_book(index).diff(previous + 1, book_id)
            bids, asks = diff.bids, diff.asks
        return encode(
            {
                "e": "depthUpdate",
                "E": now,
                "T": self._market.book_time(book_id),
                "s": spec.symbol,
                **self._pair_field(self._contracts[index]),
                "U": self.wire_id(index, first),
                "u": self.wire_id(index, book_id),
                "pu": self.wire_id(index, previous),
                "b": bids,
                "a": asks,
            }
        )

    def wire_id(self, index: int, update_id: int) -> int:
        return update_id * len(self._contracts) + index

    def model_id(self, index: int, wire_id: int) -> int:
        return max(wire_id - index, 0) // len(self._contracts)


def _pair_and_type(part: str) -> tuple[str, str]:
    """`btcusdt_current_quarter` -> ("btcusdt", "current_quarter"): contract types hold `_` too."""
    for contract_type in _CONTRACT_TYPES:
        if part.endswith("_" + contract_type):
            return part.removesuffix("_" + contract_type), contract_type
    raise InvalidStream(f"invalid continuous contract {part!r}: use <pair>_<{'|'.join(_CONTRACT_TYPES)}>")


def _carries(route: str, kind: str) -> bool:
    """Whether USDⓈ-M's path `route` ("" when unrouted) delivers streams of `kind`."""
    if kind in BOTH_ROUTES:
        return True
    home = PUBLIC if kind in PUBLIC_KINDS else MARKET
    return route == home or (not route and home == PUBLIC)
