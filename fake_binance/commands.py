"""Binance's live-control protocol on a stream connection (SUBSCRIBE and friends).

One JSON request in, one JSON response out; this module knows the message shapes
and error codes, the session behind the `Subscriptions` protocol knows the rest.
Error responses carry the request's `id` when it could be read, so a client can
match them like results.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_INT64 = range(-(2**63), 2**63)
_ID_MAX_CHARS = 36


class Subscriptions(Protocol):
    combined: bool

    def stream_names(self) -> list[str]: ...

    def subscribe(self, names: list[str]) -> None:
        """Add streams; raises ValueError with a client-facing reason."""

    def unsubscribe(self, names: list[str]) -> None: ...


class RequestError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def handle_request(raw: str | bytes, session: Subscriptions) -> bytes:
    """Apply one control request to the session and return the encoded response."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return orjson.dumps({"code": 3, "msg": f"Invalid JSON: {exc}"})
    response: dict[str, Any] = {}
    try:
        if not isinstance(request, dict):
            raise RequestError(2, "Invalid request: expected a JSON object")
        response["id"] = _request_id(request)
        response = {"result": _dispatch(request, session), **response}
    except RequestError as exc:
        response = {"code": exc.code, "msg": exc.msg, **response}
    return orjson.dumps(response)


def _request_id(request: dict[str, Any]) -> int | str | None:
    if "id" not in request:
        raise RequestError(2, "Invalid request: missing field `id`")
    value = request["id"]
    if value is None or (type(value) is int and value in _INT64):
        return value
    if isinstance(value, str) and len(value) <= _ID_MAX_CHARS:
        return value
    raise RequestError(2, "Invalid request: request ID must be an int64, a string of up to 36 characters or null")


def _dispatch(request: dict[str, Any], session: Subscriptions) -> Any:
    method = request.get("method")
    if method is None:
        raise RequestError(2, "Invalid request: missing field `method`")
    if method not in _METHODS:
        expected = ", ".join(f"`{m}`" for m in _METHODS)
        raise RequestError(2, f"Invalid request: unknown variant `{method}`, expected one of {expected}")
    params = request.get("params", [])
    if not isinstance(params, list):
        raise RequestError(2, "Invalid request: params must be an array")
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        return _change_subscriptions(method, params, session)
    if method == "LIST_SUBSCRIPTIONS":
        _expect_count(params, 0)
        return session.stream_names()
    if method == "GET_PROPERTY":
        _expect_count(params, 1)
        _property_name(params[0])
        return session.combined
    _expect_count(params, 2)
    _property_name(params[0])
    if not isinstance(params[1], bool):
        raise RequestError(1, "Invalid value type: expected Boolean")
    session.combined = params[1]
    return None


def _change_subscriptions(method: str, params: list[Any], session: Subscriptions) -> None:
    if not all(isinstance(p, str) for p in params):
        raise RequestError(2, "Invalid request: stream names must be strings")
    try:
        if method == "SUBSCRIBE":
            session.subscribe(params)
        else:
            session.unsubscribe(params)
    except ValueError as exc:
        raise RequestError(2, f"Invalid request: {exc}") from None


def _expect_count(params: list[Any], count: int) -> None:
    if len(params) > count:
        raise RequestError(2, "Invalid request: too many parameters")
    if len(params) < count:
        raise RequestError(2, "Invalid request: missing parameters")


def _property_name(name: Any) -> None:
    if not isinstance(name, str):
        raise RequestError(2, "Invalid request: property name must be a string")
    if name != "combined":
        raise RequestError(0, "Unknown property")
