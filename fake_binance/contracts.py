"""The futures contracts of the fake: which exist, their terms, and their lifecycle.

Both futures markets run on one engine, as Binance's have since COIN-M moved onto the
USDⓈ-M engine (2026-06-30): one `market.Market` prices every contract of both, and
each contract says which market (`st` 1 USDⓈ-M, 2 COIN-M) lists it. Perpetuals are
configured by name; each market adds one delivery contract on its first perpetual's
pair, `<pair>_<yymmdd>`, delivered on the last Friday of the current quarter at 08:00
UTC (counted from start-up, so it is always in the future).

A contract's status changes only by the `settle` test control: a delivery contract
becomes DELIVERING and is delisted (gone from exchangeInfo, REST says "Invalid
symbol") `delist_after` ms later; a perpetual becomes SETTLING and stays listed, as
Binance keeps delisted perpetuals. Either way its streams stop at once.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime

USDM = "usdm"
COINM = "coinm"
MARKET_TYPES = {USDM: 1, COINM: 2}  # the `st` of each market's payloads
PERPETUAL = "PERPETUAL"
CURRENT_QUARTER = "CURRENT_QUARTER"
PERPETUAL_DELIVERY_MS = 4_133_404_800_000  # 2100-12-25: Binance's "delivery date" of perpetuals
DEFAULT_FUNDING_HOURS = 8
FUNDING_HOURS = {"SOLUSDT": 4, "DOGEUSDT": 1, "ETHUSD_PERP": 4}
"""Funding intervals that are not Binance's usual 8 h: a client must take each symbol's
`T` (next funding time) from the exchange, never assume one interval."""
_DELIVERY_HOUR = 8


ONBOARD_MS = 1_569_398_400_000  # 2019-09-25, when Binance's futures opened; every contract's onboard date


@dataclass(frozen=True)
class Contract:
    """One futures contract as exchangeInfo describes it."""

    symbol: str
    market: str  # USDM or COINM
    pair: str  # "BTCUSDT", "BTCUSD": the index the contract tracks
    contract_type: str  # PERPETUAL or CURRENT_QUARTER
    delivery_ms: int
    funding_hours: int | None  # None for delivery contracts: they pay no funding

    @property
    def st(self) -> int:
        return MARKET_TYPES[self.market]

    @property
    def perpetual(self) -> bool:
        return self.contract_type == PERPETUAL

    @property
    def base_asset(self) -> str:
        return self.pair.removesuffix("USDT").removesuffix("USD")

    @property
    def quote_asset(self) -> str:
        return self.pair[len(self.base_asset) :]


@dataclass
class Lifecycle:
    """Status changes made by the `settle` control, in ms since the epoch."""

    settled_at: dict[str, int] = field(default_factory=dict)
    delisted_at: dict[str, int] = field(default_factory=dict)

    def settle(self, contract: Contract, now: int, delist_after_ms: int) -> None:
        self.settled_at[contract.symbol] = now
        if not contract.perpetual:
            self.delisted_at[contract.symbol] = now + delist_after_ms

    def status(self, contract: Contract, now: int) -> str:
        if contract.symbol not in self.settled_at:
            return "TRADING"
        return "SETTLING" if contract.perpetual else "DELIVERING"

    def listed(self, symbol: str, now: int) -> bool:
        """Whether exchangeInfo and REST still know the symbol."""
        return now < self.delisted_at.get(symbol, now + 1)

    def trading(self, symbol: str) -> bool:
        return symbol not in self.settled_at


def perpetual(symbol: str, market: str) -> Contract:
    """A perpetual by name: `BTCUSDT` (USDⓈ-M) or `BTCUSD_PERP` (COIN-M)."""
    pair = symbol.partition("_")[0]
    hours = FUNDING_HOURS.get(symbol, DEFAULT_FUNDING_HOURS)
    return Contract(symbol, market, pair, PERPETUAL, PERPETUAL_DELIVERY_MS, hours)


def quarterly(pair: str, market: str, now_ms: int) -> Contract:
    """The current-quarter delivery contract on `pair` as of `now_ms`."""
    delivery = quarter_delivery_ms(now_ms)
    day = datetime.fromtimestamp(delivery / 1000, tz=UTC).strftime("%y%m%d")
    return Contract(f"{pair}_{day}", market, pair, CURRENT_QUARTER, delivery, None)


def quarter_delivery_ms(now_ms: int) -> int:
    """The next quarterly delivery after now: last Friday of Mar/Jun/Sep/Dec, 08:00 UTC."""
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    year, month = now.year, (now.month - 1) // 3 * 3 + 3
    while True:
        delivery = _last_friday(year, month)
        if delivery > now:
            return int(delivery.timestamp()) * 1000
        year, month = (year + 1, 3) if month == 12 else (year, month + 3)


def _last_friday(year: int, month: int) -> datetime:
    last_day = calendar.monthrange(year, month)[1]
    day = last_day - (calendar.weekday(year, month, last_day) - calendar.FRIDAY) % 7
    return datetime(year, month, day, _DELIVERY_HOUR, tzinfo=UTC)


def futures_contracts(usdm: tuple[str, ...], coinm: tuple[str, ...], now_ms: int) -> tuple[Contract, ...]:
    """Every contract of the engine, USDⓈ-M first, each market's delivery contract last.

    The order fixes each contract's position, hence its trade and update ids.
    """
    contracts: list[Contract] = []
    for market, symbols in ((USDM, usdm), (COINM, coinm)):
        perpetuals = [perpetual(s, market) for s in symbols]
        contracts.extend(perpetuals)
        if perpetuals:
            contracts.append(quarterly(perpetuals[0].pair, market, now_ms))
    return tuple(contracts)
