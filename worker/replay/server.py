"""The replay served as Binance's market-data websocket and REST API.

Clients change only their base URLs: `ws://HOST:PORT` for `/ws/<stream>...`, `/ws`,
`/stream?streams=...` and `/stream`, `http://HOST:PORT` for `/api/v3/...` (`rest`).
The control messages (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY and
GET_PROPERTY `combined`) are answered as Binance answers them, an acknowledgement
always before the first frame of the streams it acknowledges, and bad requests get
Binance's `{"error": {"code", "msg"}, "id"}`. The server pings every 20 s, as Binance
does, and takes pongs (and answers pings) at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from worker.replay import rest
from worker.replay.session import SESSION, Client, Session
from worker.times import iso_ms

PING_SECONDS = 20.0
"""Binance's server pings every 20 s."""

MAX_REQUEST_ID_CHARS = 36
METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_STREAM_NAME = re.compile(r"[a-z0-9]+@[A-Za-z0-9_@:+]+")


class InvalidRequest(Exception):
    """A control message Binance would refuse: its error code (0-3) and message."""

    def __init__(self, code: int, msg: str, request_id: Any = None) -> None:
        super().__init__(msg)
        self.code, self.msg, self.request_id = code, msg, request_id


def stream_names(text: str) -> list[str]:
    """Stream names from a path or a `streams` parameter ("btcusdt@trade/ethusdt@depth"),
    the symbol lowercased as Binance names it."""
    names = []
    for name in filter(None, text.split("/")):
        symbol, at, kind = name.partition("@")
        names.append(f"{symbol.lower()}{at}{kind}")
    return names


async def raw_streams(request: web.Request) -> web.WebSocketResponse:
    """/ws and /ws/<stream>[/<stream>...]: payloads as they are."""
    return await _serve(request, stream_names(request.match_info.get("streams", "")), combined=False)


async def combined_streams(request: web.Request) -> web.WebSocketResponse:
    """/stream?streams=a/b and /stream: payloads in the {"stream", "data"} envelope."""
    return await _serve(request, stream_names(request.query.get("streams", "")), combined=True)


async def _serve(request: web.Request, named: list[str], combined: bool) -> web.WebSocketResponse:
    """One connection. A path name that is no stream name subscribes nothing: ccxt opens
    `/ws/<n>` (n a number of its own) and subscribes with SUBSCRIBE, so such a
    connection must not start the clock before its first subscription."""
    session = request.app[SESSION]
    socket = web.WebSocketResponse(heartbeat=PING_SECONDS, autoping=True)
    await socket.prepare(request)
    client = Client(socket, combined, protocol=request.protocol)
    session.clients.add(client)
    session.subscribe(client, [name for name in named if _STREAM_NAME.fullmatch(name)])
    try:
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await _answer(session, client, message.data)
    finally:
        session.forget(client)
    return socket


async def _answer(session: Session, client: Client, text: str) -> None:
    try:
        request = _parsed(text)
        await _perform(session, client, request)
    except InvalidRequest as error:
        body = {"error": {"code": error.code, "msg": error.msg}, "id": error.request_id}
        await client.socket.send_str(orjson.dumps(body).decode())


def _parsed(text: str) -> dict[str, Any]:
    """A control message checked as Binance checks it."""
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(3, f"Invalid JSON: {error}") from None
    if not isinstance(request, dict):
        raise InvalidRequest(2, "Invalid request: expected an object with `method`, `params` and `id`")
    request_id = request.get("id")
    if not _valid_id(request_id):
        raise InvalidRequest(
            2, "Invalid request: request ID must be an unsigned integer or a string of up to 36 characters"
        )
    method = request.get("method")
    if method is None:
        raise InvalidRequest(2, "Invalid request: missing field `method`", request_id)
    if method not in METHODS:
        expected = ", ".join(f"`{name}`" for name in METHODS)
        raise InvalidRequest(2, f"Invalid request: unknown variant `{method}`, expected one of {expected}", request_id)
    params = request.get("params", [])
    if not isinstance(params, list) or not all(isinstance(param, str | bool) for param in params):
        raise InvalidRequest(2, "Invalid request: params must be a list of strings", request_id)
    return request


def _valid_id(request_id: Any) -> bool:
    if request_id is None:
        return True
    if isinstance(request_id, bool):
        return False
    if isinstance(request_id, int):
        return request_id >= 0
    return isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS


async def _perform(session: Session, client: Client, request: dict[str, Any]) -> None:
    method, params, request_id = request["method"], request.get("params", []), request.get("id")
    result: Any = None
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        streams = _checked_streams(params, request_id)
        if method == "UNSUBSCRIBE":
            session.unsubscribe(client, streams)
    elif method == "LIST_SUBSCRIPTIONS":
        result = list(client.streams)
    else:
        result = _property(client, method, params, request_id)
    await client.socket.send_str(orjson.dumps({"result": result, "id": request_id}).decode())
    if method == "SUBSCRIBE":  # after the acknowledgement: no frame of these streams precedes it
        session.subscribe(client, streams)


def _checked_streams(params: list[Any], request_id: Any) -> list[str]:
    streams = stream_names("/".join(str(param) for param in params))
    if not streams or len(streams) != len(params) or not all(_STREAM_NAME.fullmatch(name) for name in streams):
        raise InvalidRequest(2, "Invalid request: invalid stream name(s)", request_id)
    return streams


def _property(client: Client, method: str, params: list[Any], request_id: Any) -> bool | None:
    if not params or params[0] != "combined":
        raise InvalidRequest(0, "Unknown property", request_id)
    if method == "GET_PROPERTY":
        return client.combined
    if len(params) != 2 or not isinstance(params[1], bool):
        raise InvalidRequest(1, "Invalid value type: expected Boolean", request_id)
    client.combined = params[1]
    return None


def replay_app(session: Session) -> web.Application:
    """The websocket routes, the REST API and /replay/gaps of one session, at the bare paths."""
    app = web.Application(middlewares=[rest.api_errors])
    app[SESSION] = session
    app.router.add_get("/ws", raw_streams)
    app.router.add_get("/ws/{streams:.+}", raw_streams)
    app.router.add_get("/stream", combined_streams)
    rest.add_routes(app)
    return app


PROGRESS_SECONDS = 5.0
"""How often `serve` prints the clock, the frames sent and the clients."""


async def serve(
    session: Session,
    host: str,
    port: int,
    say: Callable[[str], None],
    stop: asyncio.Event,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve the session until `stop` is set, printing its progress now and then; over
    TLS (wss:// and https://) with a `tls` context, as some clients take only wss://.

    Raises ValueError, with one line, when the port cannot be had (in use, not allowed).
    """
    runner = web.AppRunner(replay_app(session), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as error:
            raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}): pass a free --port") from None
        bound = runner.addresses[0][1] if port == 0 else port
        secure = "s" if tls is not None else ""
        say(f"replay: ws{secure}://{host}:{bound} and http{secure}://{host}:{bound}")
        sender = asyncio.create_task(session.run())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_SECONDS)
            say(_progress(session))
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    finally:
        for client in list(session.clients):
            await client.socket.close(code=1001, message=b"replay stopped")
        await runner.cleanup()


def _progress(session: Session) -> str:
    clock = session.clock
    state = "ended" if session.finished else "running" if clock.started else "waiting for a subscription"
    return f"clock {iso_ms(clock.now())} ({state}), frames sent {session.frames_sent}, clients {len(session.clients)}"
