"""`python -m fake_binance`: run the fake exchange until SIGTERM or SIGINT.

Flags are generated from `FakeExchangeConfig` (field `pong_timeout` -> flag
`--pong-timeout`), so the CLI always offers exactly the config's options. Once the
port accepts connections, one line `fake-binance listening on http://HOST:PORT` is
printed and flushed: a parent process waits for it to learn the port. The futures
markets' base URLs follow, one line each, in the form of the recorder's settings
(`fake-binance BINANCE_USDM_WS_URL=ws://HOST:PORT/usdm`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import typing
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from fake_binance.config import FakeExchangeConfig
from fake_binance.server import build_app, futures_urls

_SHUTDOWN_TIMEOUT_SECONDS = 5.0


def _symbol_list(values: list[str]) -> tuple[str, ...]:
    """Accept both `--symbols A B` and `--symbols A,B`."""
    return tuple(s.strip().upper() for v in values for s in v.split(",") if s.strip())


def parse_args(argv: Sequence[str] | None = None) -> FakeExchangeConfig:
    parser = argparse.ArgumentParser(prog="python -m fake_binance", description=__doc__)
    hints = typing.get_type_hints(FakeExchangeConfig)
    for f in dataclasses.fields(FakeExchangeConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": f"{f.metadata['doc']} (default: {f.default})",
        }
        if hint == tuple[str, ...]:
            kwargs["nargs"] = "*"
        else:
            kwargs["type"] = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        parser.add_argument(flag, **kwargs)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    for name in ("symbols", "halted_symbols", "unlisted_symbols", "usdm_symbols", "coinm_symbols"):
        if name in given:
            given[name] = _symbol_list(given[name])
    return FakeExchangeConfig(**given)


async def serve(config: FakeExchangeConfig) -> None:
    runner = web.AppRunner(build_app(config), shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        port = runner.addresses[0][1]
        base = f"http://{config.host}:{port}"
        print(f"fake-binance listening on {base}", flush=True)
        for name, url in futures_urls(base).items():
            print(f"fake-binance {name}={url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
