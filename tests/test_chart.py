"""PNG charts from klines and from trades, against real SQLite files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.test_export import MINUTE, T, kline_rows, store, trade_rows
from worker.ops.chart import ChartSummary, draw_chart
from worker.store.storage import create_schema, make_engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'chart.db'}")
    create_schema(engine)
    return engine


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its magic."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_MAGIC
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_klines_are_drawn_as_candles(engine: Engine, tmp_path: Path) -> None:
    store(engine, {"klines": kline_rows("BTCUSDT", "1m", 180, MINUTE), "trades": trade_rows("BTCUSDT", 500)})
    path = tmp_path / "btc.png"

    summary = draw_chart(engine, "btcusdt", T, T + 180 * MINUTE, path)

    assert summary == ChartSummary(path, "klines 1m", 180, 180 * MINUTE, 180 * MINUTE)
    assert png_size(path) == (1200, 700)


def test_the_interval_asked_for_wins_else_the_smallest(engine: Engine, tmp_path: Path) -> None:
    store(engine, {"klines": kline_rows("BTCUSDT", "5m", 36, 5 * MINUTE)
                   + kline_rows("BTCUSDT", "1h", 3, 60 * MINUTE)})  # fmt: skip
    end = T + 180 * MINUTE

    assert draw_chart(engine, "BTCUSDT", T, end, tmp_path / "a.png").source == "klines 5m"
    assert draw_chart(engine, "BTCUSDT", T, end, tmp_path / "b.png", interval="1h").points == 3
    assert draw_chart(engine, "BTCUSDT", T, end, tmp_path / "c.png", interval="1m").source == "klines 5m"


def test_the_data_covering_most_of_the_window_is_drawn_and_the_summary_says_so(engine: Engine, tmp_path: Path) -> None:
    # 43 one-second klines from a stream unsubscribed long ago, then 15 minutes of trades.
    trades = [row for row in trade_rows("SOLUSDT", 20_000, start=T + 5 * MINUTE) if row[4] < T + 20 * MINUTE]
    store(engine, {"klines": kline_rows("SOLUSDT", "1s", 43, 1000), "trades": trades})

    summary = draw_chart(engine, "SOLUSDT", T, T + 20 * MINUTE, tmp_path / "sol.png")

    assert summary.source == "trades" and summary.window_ms == 20 * MINUTE
    assert 14 * MINUTE < summary.covered_ms <= 15 * MINUTE
    assert "from trades (the data covering most of the window: 7" in summary.describe(1200, 700)
    only_klines = draw_chart(engine, "SOLUSDT", T, T + MINUTE, tmp_path / "early.png")
    assert (only_klines.source, only_klines.covered_ms) == ("klines 1s", 43_000)


def test_many_klines_are_merged_to_fit_the_width(engine: Engine, tmp_path: Path) -> None:
    store(engine, {"klines": kline_rows("BTCUSDT", "1m", 1440, MINUTE)})

    summary = draw_chart(engine, "BTCUSDT", T, T + 1440 * MINUTE, tmp_path / "day.png", width_px=800)

    assert summary.source == "klines 1m"
    assert summary.points == 1440 // 10  # 800 px allow 200 candles: 10 minutes each


def test_without_klines_trades_are_drawn(engine: Engine, tmp_path: Path) -> None:
    trades = trade_rows("ETHUSDT", 20_000)
    store(engine, {"trades": trades, "klines": kline_rows("BTCUSDT", "1m", 10, MINUTE)})
    path = tmp_path / "eth.png"

    summary = draw_chart(engine, "ETHUSDT", T, trades[-1][4] + 1, path, width_px=1000, height_px=600)

    assert summary.source == "trades" and 10 < summary.points <= 1000 // 4
    assert png_size(path) == (1000, 600)


@pytest.mark.parametrize("size", [(400, 300), (701, 333), (1201, 701), (1999, 1117)])
def test_the_png_has_exactly_the_size_asked_for(engine: Engine, tmp_path: Path, size: tuple[int, int]) -> None:
    store(engine, {"trades": trade_rows("BTCUSDT", 300)})
    path = tmp_path / "sized.png"

    draw_chart(engine, "BTCUSDT", T, T + 60 * MINUTE, path, *size)

    assert png_size(path) == size


def test_nothing_to_draw_says_why(engine: Engine, tmp_path: Path) -> None:
    store(engine, {"klines": kline_rows("BTCUSDT", "1m", 10, MINUTE), "trades": trade_rows("ETHUSDT", 10)})
    path = tmp_path / "none.png"

    with pytest.raises(ValueError) as error:
        draw_chart(engine, "BTCUSDT", T + 60 * MINUTE, T + 120 * MINUTE, path)

    message = str(error.value)
    assert message.startswith("nothing to chart: no klines rows for BTCUSDT from 2026-11-24T02:00:00.000Z")
    assert "they run from 2026-11-24T01:00:00.000Z to 2026-11-24T01:09:00.000Z" in message
    assert "no trades rows for BTCUSDT: the trades table holds ETHUSDT" in message
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"start_ms": T, "end_ms": T - 1}, "is not before the end"),
     ({"interval": "2m"}, "unknown kline interval '2m'"),
     ({"width_px": 100}, "a chart of 100x700 pixels cannot be drawn")],
)  # fmt: skip
def test_bad_requests_are_refused(engine: Engine, tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"start_ms": T, "end_ms": T + MINUTE, **kwargs}
    with pytest.raises(ValueError, match=message):
        draw_chart(engine, "BTCUSDT", path=tmp_path / "x.png", **arguments)
