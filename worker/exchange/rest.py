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
from typing import Any, TypedDict

import redis
import requests

from worker.exchange.ratelimit import (
    BACKOFF,
    BAN,
    MINUTE_MS,
    PROCESS_STATE,
    LimitState,
    RedisLimitState,
    RequestPacer,
    RestUnavailable,
)
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.streams import COINM, SPOT, USDM

log = logging.getLogger(__name__)

REQUEST_WEIGHTS: dict[str, int] = {
    "ping": 1,
    "time": 1,
    "exchangeInfo": 20,
    "klines": 2,
    "aggTrades": 4,
    "historicalTrades": 25,
}
"""Binance's request weight per endpoint (the forms this client sends)."""

DEPTH_WEIGHTS: tuple[tuple[int, int], ...] = ((100, 5), (500, 25), (1000, 50), (5000, 250))
"""GET /api/v3/depth costs by its limit: up to 100 levels 5, 500 25, 1000 50, 5000 250."""

MAX_DEPTH_LIMIT = 5000

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

LISTING_WEIGHTS: dict[str, int] = {SPOT: 20, USDM: 1, COINM: 1}
"""The weight of a market's whole `exchangeInfo`."""

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
    M: bool


"""A row of /api/v3/aggTrades: agg id, price, qty, first/last trade id, time, maker."""

KlineRow = list[Any]
"""A row of /api/v3/klines: [open time, o, h, l, c, volume, close time, quote volume,
trades, taker buy base volume, taker buy quote volume, ignore]."""


class BinanceRest:
    """A client of Binance's REST API.

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
        self.session = requests.Session()
        self.pacer = pacer or RequestPacer(PROCESS_STATE)
        self._server_offset_ms: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None, market: str = SPOT) -> BinanceRest:
        """The client of `market`'s API a task uses: budget and longest wait from the
        settings, shared through Redis (`client`, normally
        `tasks.resources.redis_client()`) or, when it is None, kept in this process."""
        state: LimitState = (
            PROCESS_STATE if client is None else RedisLimitState(client, RedisKeys(settings.redis_prefix))
        )
        pacer = RequestPacer(
            state,
            budget_per_minute=settings.rest_weight_budget_per_minute,
            max_wait_seconds=settings.rest_max_wait_seconds,
        )
        return cls(settings.rest_url(market), settings.rest_timeout_seconds, pacer, market)

    def get(self, path: str, params: Mapping[str, Any] | None = None, weight: int | None = None) -> Any:
        """GET <API_PATHS[market]>/<path> (/api/v3/<path> on spot); returns the decoded
        JSON answer. `weight` for endpoints whose weight depends on the parameters
        (default: REQUEST_WEIGHTS[path]).

        Raises BinanceError for an answer Binance refused (4xx other than 429/418),
        RestUnavailable when a ban lasts too long or every attempt failed.
        """
        weight = _weight(path) if weight is None else weight
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
        url = self.base_url + self.api_path
        cached = _LISTINGS.get(url)
        if cached is None or time.monotonic() - cached[0] > max_age_seconds:
            entries = self.get("exchangeInfo", {}, LISTING_WEIGHTS[self.market])["symbols"]
            # COIN-M's entries say `contractStatus` where the others say `status`.
            listing = {entry["symbol"]: entry.get("status") or entry["contractStatus"] for entry in entries}
            cached = _LISTINGS[url] = (time.monotonic(), listing)
        return cached[1]

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
        return self._symbol_get(symbol, "klines", params)

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
        """The order book now: {"lastUpdateId", "bids", "asks"}, best levels first."""
        return self._symbol_get(symbol, "depth", {"limit": limit}, depth_weight(limit))

    def _symbol_get(self, symbol: str, path: str, params: Mapping[str, Any], weight: int | None = None) -> Any:
        """GET an endpoint about one symbol; Binance's -1121 becomes UnknownSymbol."""
        sent = {"symbol": symbol, **{k: v for k, v in params.items() if v is not None}}
        try:
            return self.get(path, sent, weight)
        except BinanceError as error:
            if error.code == INVALID_SYMBOL:
                raise _unknown_symbol(symbol, error.msg) from None
            raise


def depth_weight(limit: int) -> int:
    """The weight of a depth request; a limit Binance refuses raises ValueError."""
    for most, weight in DEPTH_WEIGHTS:
        if 1 <= limit <= most:
            return weight
    raise ValueError(f"depth limit {limit} is out of range: Binance accepts 1 to {MAX_DEPTH_LIMIT}")


def _weight(path: str) -> int:
    try:
        return REQUEST_WEIGHTS[path]
    except KeyError:
        raise ValueError(
            f"no request weight known for endpoint {path!r}: add Binance's weight for it "
            "to worker.exchange.rest.REQUEST_WEIGHTS, so that the shared budget counts it"
        ) from None


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
