"""Binance's REST API: the few endpoints the service calls.

Binance answers errors as `{"code": <negative>, "msg": ...}`; they are raised as
`BinanceError` carrying both, so a caller can pass Binance's own words to the user.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import requests


class BinanceError(RuntimeError):
    def __init__(self, status: int, code: int | None, msg: str, url: str) -> None:
        super().__init__(f"Binance answered HTTP {status} (code {code}): {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.url = url


class UnknownSymbol(ValueError):
    """A symbol Binance does not list. One plain message argument, so that Celery can
    carry it to a caller's `.get()` intact."""


def _unknown_symbol(symbol: str, binance_msg: str) -> UnknownSymbol:
    return UnknownSymbol(
        f"unknown symbol {symbol}: Binance says {binance_msg!r}; check the spelling "
        "(spot symbols look like BTCUSDT)"
    )


INVALID_SYMBOL = -1121


class BinanceRest:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        url = f"{self.base_url}/api/v3/{path}"
        response = self.session.get(url, params=params, timeout=self.timeout)
        if response.status_code != 200:
            raise _error_from(response, url)
        return response.json()

    def symbol_statuses(self, symbols: Sequence[str]) -> dict[str, str]:
        """Trading status per symbol; raises UnknownSymbol naming the first unknown one.

        One request covers all symbols. Binance's -1121 does not say which symbol is
        unknown, so only then are the symbols asked one by one to name it.
        """
        try:
            info = self.get("exchangeInfo", {"symbols": json.dumps(list(symbols), separators=(",", ":"))})
        except BinanceError as error:
            if error.code != INVALID_SYMBOL:
                raise
            self._raise_for_first_unknown(symbols)
            raise
        return {entry["symbol"]: entry["status"] for entry in info["symbols"]}

    def _raise_for_first_unknown(self, symbols: Sequence[str]) -> None:
        for symbol in symbols:
            try:
                self.get("exchangeInfo", {"symbol": symbol})
            except BinanceError as error:
                if error.code == INVALID_SYMBOL:
                    raise _unknown_symbol(symbol, error.msg) from None
                raise


def _error_from(response: requests.Response, url: str) -> BinanceError:
    try:
        body = response.json()
        code, msg = body.get("code"), body.get("msg", response.text)
    except ValueError:
        code, msg = None, response.text[:200]
    return BinanceError(response.status_code, code, msg, url)
