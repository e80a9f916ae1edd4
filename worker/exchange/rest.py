"""Binance's REST API: the few endpoints the service calls, within Binance's limits.

Every request first passes the shared `RequestPacer` (weight budget, 429 back-off,
418 ban; see worker/exchange/ratelimit.py), so that no worker can get the IP banned. Timeouts,
dropped connections and 5xx answers are retried with exponential back-off; a 429 or
418 is retried once its Retry-After has passed. Binance answers errors as
`{"code": <negative>, "msg": ...}`; they are raised as `BinanceError` carrying both,
so a caller can pass Binance's own words to the user.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import redis
import requests

from worker.exchange.ratelimit import (
    BACKOFF,
    BAN,
    FUTURES_POOL,
    MINUTE_MS,
    PROCESS_STATES,
    LimitState,
    RedisLimitState,
    RequestPacer,
    RestUnavailable,
)
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.streams import COINM, SPOT, USDM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestRules:
    """What differs between Binance's REST APIs (spot's `/api/v3`, the futures' `/fapi/v1`
    and `/dapi/v1`): the request weights, the deepest snapshot, the budget pool they
    spend and the setting of that budget, for messages."""

    weights: Mapping[str, int]
    """Weight per endpoint whose weight does not depend on its parameters."""
    depth_weights: tuple[tuple[int, int], ...]
    """(most levels, weight), ascending: a depth request costs the first that holds its limit."""
    kline_weights: tuple[tuple[int, int], ...]
    """(most klines, weight), ascending, likewise for klines."""
    pool: str
    budget_setting: str

    @property
    def max_depth_limit(self) -> int:
        return self.depth_weights[-1][0]

    @property
    def cheapest_depth_limit(self) -> int:
        """The most levels a depth request of the lowest weight holds (spot: 100 at weight 5)."""
        return self.depth_weights[0][0]

    def depth_weight(self, limit: int) -> int:
        """The weight of a depth request; a limit Binance refuses raises ValueError."""
        return _by_limit(self.depth_weights, limit, "depth")

    def budget_per_minute(self, settings: Settings) -> int:
        """The weight all workers may spend per minute from this market's pool."""
        if self.pool == FUTURES_POOL:
            return settings.futures_rest_weight_budget_per_minute
        return settings.rest_weight_budget_per_minute


SPOT_RULES = RestRules(
    weights={"ping": 1, "time": 1, "exchangeInfo": 20, "aggTrades": 4, "historicalTrades": 25},
    depth_weights=((100, 5), (500, 25), (1000, 50), (5000, 250)),
    kline_weights=((1000, 2),),
    pool="",
    budget_setting="REST_WEIGHT_BUDGET_PER_MINUTE",
)
"""GET /api/v3/...: depth 5 up to 100 levels, 25 to 500, 50 to 1000, 250 to 5000."""

_FUTURES_WEIGHTS = {"ping": 1, "time": 1, "exchangeInfo": 1, "aggTrades": 20, "openInterest": 1, "fundingRate": 1}
_FUTURES_DEPTH_WEIGHTS = ((50, 2), (100, 5), (500, 10), (1000, 20))
_FUTURES_KLINE_WEIGHTS = ((99, 1), (499, 2), (1000, 5), (1500, 10))
REST_RULES: dict[str, RestRules] = {
    SPOT: SPOT_RULES,
    **{
        market: RestRules(
            _FUTURES_WEIGHTS,
            _FUTURES_DEPTH_WEIGHTS,
            _FUTURES_KLINE_WEIGHTS,
            FUTURES_POOL,
            "FUTURES_REST_WEIGHT_BUDGET_PER_MINUTE",
        )
        for market in (USDM, COINM)
    },
}
"""Each market's rules. The futures APIs weigh alike (depth 2/5/10/20 up to 50/100/500/1000
levels, at most 1,000; aggTrades 20; klines by their limit) and spend one budget: since
2026-06-30 `/fapi` and `/dapi` share 2,400 a minute per IP (binance-protocol.md).
`fundingRate` has a limit of its own (500 requests per 5 minutes with fundingInfo) and is
counted 1 here, far below it at any poll this service makes."""

MAX_LIMIT = 1000
"""Most rows Binance returns per page of klines, aggTrades and historicalTrades."""

ATTEMPTS = 5
"""Tries per request; the back-off between them is 0.5, 1, 2, 4 s for transient errors."""
_FIRST_BACKOFF_SECONDS = 0.5
# Binance's ban lasts 2 min to 3 days; a 418 without Retry-After is taken as the shortest.
_DEFAULT_BAN_SECONDS = 120.0


class BinanceError(RuntimeError):
    def __init__(self, status: int, code: int | None, msg: str, url: str) -> None:
        super().__init__(f"Binance answered HTTP {status} (code {code}): {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.url = url


API_PATHS: dict[str, str] = {SPOT: "/api/v3", USDM: "/fapi/v1", COINM: "/dapi/v1"}
"""The path of each market's REST API under its base URL."""

REST_URL_SETTINGS: dict[str, str] = {
    SPOT: "BINANCE_REST_URL",
    USDM: "BINANCE_USDM_REST_URL",
    COINM: "BINANCE_COINM_REST_URL",
}

SYMBOL_EXAMPLES: dict[str, str] = {
    SPOT: "spot symbols look like BTCUSDT",
    USDM: "USDⓈ-M symbols look like BTCUSDT or BTCUSDT_261225",
    COINM: "COIN-M symbols look like BTCUSD_PERP or BTCUSD_261225",
}


class UnknownSymbol(ValueError):
    """A symbol Binance does not list. One plain message argument, so that Celery can
    carry it to a caller's `.get()` intact."""


def _unknown_symbol(symbol: str, binance_msg: str, count: int = 1, market: str = SPOT) -> UnknownSymbol:
    what = "unknown symbol" if count == 1 else f"{count} unknown symbols:"
    where = "" if market == SPOT else f" on {market}"
    return UnknownSymbol(
        f"{what} {symbol}{where}: Binance says {binance_msg!r}; check the spelling ({SYMBOL_EXAMPLES[market]})"
    )


INVALID_SYMBOL = -1121
SYMBOLS_PER_REQUEST = 100
"""Symbols named in one exchangeInfo request at most (a 100-symbol URL is about 1.5 KiB)."""
MAX_SYMBOLS_NAMED = 5000
"""Unknown symbols an error names; past them it counts the rest (5,000 names are about
60 KiB: a message of every one of 100,000 would be a megabyte on one line)."""
LISTING_CACHE_SECONDS = 60.0
# Binance's whole listing per base URL, with when it was fetched (per process).
_LISTINGS: dict[str, tuple[float, dict[str, str]]] = {}


def _raise_for_unknown(symbols: Sequence[str], binance_msg: str, listing: Mapping[str, str], market: str) -> None:
    """UnknownSymbol naming the symbols Binance does not list (the first 5,000 of them)."""
    unknown = [symbol for symbol in symbols if symbol not in listing]
    if unknown:
        named = ", ".join(unknown[:MAX_SYMBOLS_NAMED])
        if len(unknown) > MAX_SYMBOLS_NAMED:
            named += f" and {len(unknown) - MAX_SYMBOLS_NAMED} more"
        raise _unknown_symbol(named, binance_msg, len(unknown), market)


@dataclass(frozen=True)
class Listed:
    """A symbol as exchangeInfo lists it: its status and quote asset."""

    status: str
    quote_asset: str | None


def listed(info: Mapping[str, Any]) -> dict[str, Listed]:
    """Every symbol of an exchangeInfo answer. COIN-M's entries say `contractStatus`
    where the others say `status`."""
    return {
        entry["symbol"]: Listed(entry.get("status") or entry["contractStatus"], entry.get("quoteAsset"))
        for entry in info["symbols"]
    }


class TradeRow(TypedDict):
    """A row of /api/v3/historicalTrades."""

    id: int
    price: str
    qty: str
    quoteQty: str
    time: int
    isBuyerMaker: bool
    isBestMatch: bool


class AggTradeRow(TypedDict):
    a: int
    p: str
    q: str
    f: int
    l: int  # noqa: E741  (Binance's field name)
    T: int
    m: bool
    M: NotRequired[bool]  # spot only
    nq: NotRequired[str]  # futures: quantity without RPI orders, where Binance sends it


"""A row of /api/v3/aggTrades (/fapi, /dapi): agg id, price, qty, first/last trade id, time, maker."""


class FundingRow(TypedDict):
    """A row of /fapi/v1/fundingRate (/dapi): older fundings have no (or an empty) mark price."""

    symbol: str
    fundingTime: int
    fundingRate: str
    markPrice: str


KlineRow = list[Any]
"""A row of /api/v3/klines: [open time, o, h, l, c, volume, close time, quote volume,
trades, taker buy base volume, taker buy quote volume, ignore]."""


class BinanceRest:
    """A client of one market's Binance REST API (spot's by default).

    Without a `pacer` the weight budget is kept in this process only, which is fine
    for a one-off call; workers build theirs with `from_settings` and Redis, so that
    they all share one budget.
    """

    def __init__(
        self, base_url: str, timeout: float = 10.0, pacer: RequestPacer | None = None, market: str = SPOT
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.market = market
        self.api_path = API_PATHS[market]
        self.timeout = timeout
        self.rules = REST_RULES[market]
        self.pacer = pacer or RequestPacer(PROCESS_STATES[self.rules.pool], budget_setting=self.rules.budget_setting)
        self.session = requests.Session()
        self._server_offset_ms: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None, market: str = SPOT) -> BinanceRest:
        """The client a task uses for `market`: base URL, budget and longest wait from the
        settings, shared through Redis (`client`, normally `tasks.resources.redis_client()`)
        or, when it is None, kept in this process. The futures markets share one budget."""
        rules = REST_RULES[market]
        state: LimitState = (
            PROCESS_STATES[rules.pool]
            if client is None
            else RedisLimitState(client, RedisKeys(settings.redis_prefix), rules.pool)
        )
        pacer = RequestPacer(
            state,
            budget_per_minute=rules.budget_per_minute(settings),
            max_wait_seconds=settings.rest_max_wait_seconds,
            budget_setting=rules.budget_setting,
        )
        return cls(settings.rest_url(market), settings.rest_timeout_seconds, pacer, market)

    def get(self, path: str, params: Mapping[str, Any] | None = None, weight: int | None = None) -> Any:
        """GET <the market's API>/<path>; returns the decoded JSON answer. `weight` for
        endpoints whose weight depends on the parameters (default: the rules' weight).

        Raises BinanceError for an answer Binance refused (4xx other than 429/418),
        RestUnavailable when a ban lasts too long or every attempt failed.
        """
        weight = self._weight(path) if weight is None else weight
        url = f"{self.base_url}{self.api_path}/{path}"
        failure = ""
        for attempt in range(1, ATTEMPTS + 1):
            self.pacer.before_request(weight)
            try:
                response = self.session.get(url, params=params, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                self.pacer.after_response(response.headers)
                if response.status_code == 200:
                    return response.json()
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code in (429, 418):
                    self._back_off_as_told(response)
                    continue
                if response.status_code < 500:
                    raise _error_from(response, url)
            if attempt < ATTEMPTS:
                delay = _FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1)
                log.warning("GET %s failed (%s); retry %d in %.1f s", path, failure, attempt, delay)
                self.pacer.sleep(delay)
        raise RestUnavailable(
            f"GET {url} failed {ATTEMPTS} times, last with {failure}; check that "
            f"{REST_URL_SETTINGS[self.market]} is reachable from this machine"
        )

    def _back_off_as_told(self, response: requests.Response) -> None:
        kind = BAN if response.status_code == 418 else BACKOFF
        retry_after = _retry_after_seconds(response)
        if retry_after is None:
            # 429 without the header: Binance counts weight per minute, so wait for the next.
            retry_after = _DEFAULT_BAN_SECONDS if kind == BAN else (MINUTE_MS - self.pacer.now_ms() % MINUTE_MS) / 1000
        self.pacer.block(kind, retry_after)

    def server_time_ms(self) -> int:
        """Binance's clock now, in ms: asked once, then followed with the local clock.

        Whether a kline has closed is decided by Binance's clock, not ours, so that a
        local clock that runs ahead never stores an open kline as closed.
        """
        if self._server_offset_ms is None:
            asked_at = self.pacer.now_ms()
            server = int(self.get("time")["serverTime"])
            self._server_offset_ms = server - (asked_at + self.pacer.now_ms()) // 2
        return self.pacer.now_ms() + self._server_offset_ms

    def symbol_statuses(self, symbols: Sequence[str]) -> dict[str, str]:
        """Trading status per symbol; raises UnknownSymbol naming every unknown one.

        One request covers all symbols: up to SYMBOLS_PER_REQUEST by name, more from the
        whole listing (same weight, one request, cached a minute): Binance refuses a URL
        over 8 KiB, measured: 100,000 symbols by name failed with HTTP 400 after 80 s.
        Binance's -1121 does not say which symbol is unknown, so only then is the whole
        listing fetched (one request, weight 20, where asking each symbol would cost 20
        per symbol) to name them all.

        The futures markets' exchangeInfo takes no symbols: their whole listing is asked
        (weight 1, so fresh each time: a contract that just settled is seen as such).
        """
        if self.market != SPOT:
            return self._statuses_from_listing(symbols, self.listing())
        if len(symbols) > SYMBOLS_PER_REQUEST:
            return self._statuses_from_listing(symbols, self._listing())
        try:
            info = self.get("exchangeInfo", {"symbols": json.dumps(list(symbols), separators=(",", ":"))})
        except BinanceError as error:
            if error.code != INVALID_SYMBOL:
                raise
            _raise_for_unknown(symbols, error.msg, self._listing(), self.market)
            raise
        return {entry["symbol"]: entry["status"] for entry in info["symbols"]}

    def _statuses_from_listing(self, symbols: Sequence[str], listing: Mapping[str, str]) -> dict[str, str]:
        _raise_for_unknown(symbols, "Invalid symbol.", listing, self.market)
        return {symbol: listing[symbol] for symbol in symbols}

    def _listing(self, max_age_seconds: float = LISTING_CACHE_SECONDS) -> dict[str, str]:
        """Every symbol Binance lists, with its status; cached `max_age_seconds` per process."""
        cached = _LISTINGS.get(self.base_url + self.api_path)
        if cached is None or time.monotonic() - cached[0] > max_age_seconds:
            return {symbol: entry.status for symbol, entry in listed(self.exchange_info()).items()}
        return cached[1]

    def exchange_info(self) -> dict[str, Any]:
        """The market's whole exchangeInfo now (weight 20 on spot, 1 on futures); it
        refreshes the listing this process caches for `symbol_statuses`."""
        info: dict[str, Any] = self.get("exchangeInfo", {})
        statuses = {symbol: entry.status for symbol, entry in listed(info).items()}
        _LISTINGS[self.base_url + self.api_path] = (time.monotonic(), statuses)
        return info

    def pairs(self) -> set[str]:
        """The pairs a futures market's contracts track (exchangeInfo's `pair`: BTCUSDT,
        BTCUSD), which its pair kinds (`indexPrice`, `continuousKline_<i>`) are named by."""
        return {entry["pair"] for entry in self.get("exchangeInfo", {})["symbols"] if entry.get("pair")}

    def listing(self) -> dict[str, str]:
        """Every symbol of the market with its status now (not a cached copy)."""
        return self._listing(max_age_seconds=0)

    def klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = MAX_LIMIT,
    ) -> list[KlineRow]:
        """Klines by open time, ascending; bounds inclusive; the newest may be open."""
        params = {"interval": interval, "startTime": start_ms, "endTime": end_ms, "limit": limit}
        return self._symbol_get(symbol, "klines", params, _by_limit(self.rules.kline_weights, limit, "kline"))

    def agg_trades(
        self,
        symbol: str,
        from_id: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = MAX_LIMIT,
    ) -> list[AggTradeRow]:
        """Aggregate trades from `from_id`, or in [start_ms, end_ms] (at most one hour
        apart, Binance's rule), ascending; without bounds the most recent ones."""
        params = {"fromId": from_id, "startTime": start_ms, "endTime": end_ms, "limit": limit}
        return self._symbol_get(symbol, "aggTrades", params)

    def historical_trades(self, symbol: str, from_id: int | None = None, limit: int = MAX_LIMIT) -> list[TradeRow]:
        """Trades from `from_id` on, ascending; without it the most recent ones."""
        return self._symbol_get(symbol, "historicalTrades", {"fromId": from_id, "limit": limit})

    def depth(self, symbol: str, limit: int) -> dict[str, Any]:
        """The order book now: {"lastUpdateId", "bids", "asks"} (futures: also "E", "T"),
        best levels first. A limit deeper than the market serves (futures: 1,000) asks
        for its deepest."""
        limit = min(limit, self.rules.max_depth_limit)
        return self._symbol_get(symbol, "depth", {"limit": limit}, self.rules.depth_weight(limit))

    def open_interest(self, symbol: str) -> dict[str, Any]:
        """Futures only: {"symbol", "openInterest", "time"} now (COIN-M adds pair and contract type)."""
        return self._symbol_get(symbol, "openInterest", {})

    def funding_rates(self, symbol: str, start_ms: int, end_ms: int | None, limit: int) -> list[FundingRow]:
        """Futures only: the fundings of a perpetual from `start_ms` to `end_ms`
        (inclusive), oldest first, at most `limit` (Binance: 1,000)."""
        params = {"startTime": start_ms, "endTime": end_ms, "limit": limit}
        return self._symbol_get(symbol, "fundingRate", params)

    def _weight(self, path: str) -> int:
        try:
            return self.rules.weights[path]
        except KeyError:
            raise ValueError(
                f"no request weight known for endpoint {path!r} of {self.api_path}: add Binance's "
                "weight for it to its RestRules in worker.exchange.rest, so that the shared budget counts it"
            ) from None

    def _symbol_get(self, symbol: str, path: str, params: Mapping[str, Any], weight: int | None = None) -> Any:
        """GET an endpoint about one symbol; Binance's -1121 becomes UnknownSymbol."""
        sent = {"symbol": symbol, **{k: v for k, v in params.items() if v is not None}}
        try:
            return self.get(path, sent, weight)
        except BinanceError as error:
            if error.code == INVALID_SYMBOL:
                raise _unknown_symbol(symbol, error.msg) from None
            raise


def _by_limit(table: tuple[tuple[int, int], ...], limit: int, what: str) -> int:
    """The weight of a request whose weight grows with its `limit`; ValueError past the table."""
    for most, weight in table:
        if 1 <= limit <= most:
            return weight
    raise ValueError(f"{what} limit {limit} is out of range: Binance accepts 1 to {table[-1][0]}")


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_from(response: requests.Response, url: str) -> BinanceError:
    try:
        body = response.json()
        code, msg = body.get("code"), body.get("msg", response.text)
    except ValueError:
        code, msg = None, response.text[:200]
    return BinanceError(response.status_code, code, msg, url)
