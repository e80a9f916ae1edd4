"""Symbol normalisation, stream naming and grouping."""

from __future__ import annotations

import pytest

from worker.groups import Group, InvalidSubscription, group_id, normalize_symbols, plan_groups, stream_names
from worker.ingest.session import MAX_URL_CHARS, split_streams_for_url


def test_symbols_are_upper_cased_and_deduplicated() -> None:
    assert normalize_symbols(["btcusdt", " ETHUSDT", "BTCUSDT"]) == ["BTCUSDT", "ETHUSDT"]


@pytest.mark.parametrize(
    ("symbols", "message"),
    [
        ("BTCUSDT", "must be a list"),
        (["BTC/USDT"], "'BTC/USDT' is not a Binance symbol"),
        (["A" * 21], "is not a Binance symbol"),
        ([], "no symbols given"),
    ],
)
def test_bad_symbols_are_refused_with_a_message_that_says_what_to_do(symbols: object, message: str) -> None:
    with pytest.raises(InvalidSubscription, match=message):
        normalize_symbols(symbols)  # type: ignore[arg-type]


def test_stream_names_are_lowercase_symbol_at_kind() -> None:
    assert stream_names(["BTCUSDT", "ETHUSDT"], ["trade", "kline_1m"]) == [
        "btcusdt@trade",
        "btcusdt@kline_1m",
        "ethusdt@trade",
        "ethusdt@kline_1m",
    ]


def test_groups_hold_at_most_the_connection_limit_and_ids_depend_only_on_the_streams() -> None:
    streams = [f"s{i:04d}usdt@trade" for i in range(2500)]
    groups = plan_groups(streams, 1024)

    assert [len(g.streams) for g in groups] == [1024, 1024, 452]
    assert [s for g in groups for s in g.streams] == streams
    assert groups[0].id == group_id(reversed(groups[0].streams))
    assert len({g.id for g in groups}) == 3


def test_group_round_trips_through_json() -> None:
    group = Group(id="g1", streams=("btcusdt@trade", "ethusdt@ticker"))
    assert Group.from_json(group.to_json()) == group
    assert group.symbols == ["BTCUSDT", "ETHUSDT"]


def test_long_stream_lists_are_split_between_the_url_and_later_subscribe_requests() -> None:
    streams = [f"sym{i:04d}usdt@kline_1m" for i in range(1024)]
    url, late = split_streams_for_url("wss://example.test/", streams)

    assert url.startswith("wss://example.test/stream?streams=sym0000usdt@kline_1m/")
    assert len(url) <= MAX_URL_CHARS
    in_url = url.split("=", 1)[1].split("/")
    assert in_url + late == streams and late


def test_short_stream_lists_fit_in_the_url() -> None:
    url, late = split_streams_for_url("ws://127.0.0.1:9", ["btcusdt@trade", "btcusdt@ticker"])
    assert url == "ws://127.0.0.1:9/stream?streams=btcusdt@trade/btcusdt@ticker"
    assert late == []
