"""Symbol normalisation, stream naming and grouping."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import redis

from worker.groups import (
    Group,
    GroupRegistry,
    InvalidSubscription,
    group_id,
    normalize_symbols,
    place_streams,
    stream_names,
)
from worker.ingest.session import MAX_URL_CHARS, split_streams_for_url
from worker.keys import RedisKeys


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
    groups = place_streams([], streams, 1024)[1]

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


def test_new_streams_join_groups_with_room_and_only_the_rest_start_a_group() -> None:
    full = Group("gfull", tuple(f"s{i}usdt@trade" for i in range(4)))
    roomy = Group("groomy", ("btcusdt@trade", "btcusdt@ticker"))

    grown, new = place_streams([full, roomy], ["ethusdt@trade", "ethusdt@ticker", "bnbusdt@trade"], 4)

    assert grown == [Group("groomy", ("btcusdt@trade", "btcusdt@ticker", "ethusdt@trade", "ethusdt@ticker"))]
    assert [g.streams for g in new] == [("bnbusdt@trade",)]


def test_a_symbols_streams_stay_together_and_new_ids_never_reuse_a_living_groups() -> None:
    # This group started as ("solusdt@trade",) and has changed since; its id stays.
    living = Group(group_id(["solusdt@trade"]), ("xrpusdt@trade", "xrpusdt@ticker", "adausdt@trade"))

    grown, new = place_streams([living], ["dotusdt@trade", "dotusdt@ticker", "solusdt@trade"], 4)

    assert grown == [Group(living.id, (*living.streams, "solusdt@trade"))]
    assert [g.streams for g in new] == [("dotusdt@trade", "dotusdt@ticker")]
    _, again = place_streams([Group(living.id, (*living.streams, "adausdt@ticker"))], ["solusdt@trade"], 4)
    assert again[0].streams == ("solusdt@trade",) and again[0].id != living.id


def test_spot_group_ids_are_what_they_were_and_futures_ids_differ_per_market() -> None:
    # The sha1 of "btcusdt@aggTrade": groups saved in Redis before markets existed keep their id.
    assert group_id(["btcusdt@aggTrade"]) == "g" + hashlib.sha1(b"btcusdt@aggTrade").hexdigest()[:12]
    ids = {market: group_id(["btcusdt@aggTrade"], market) for market in ("spot", "usdm", "coinm")}
    assert len(set(ids.values())) == 3


def test_a_group_saved_before_markets_is_spot_and_futures_groups_keep_their_market() -> None:
    old = Group.from_json('{"id": "gabc", "streams": ["btcusdt@trade"]}')
    assert old == Group("gabc", ("btcusdt@trade",), "spot") and "market" not in old.to_json()
    usdm = Group("gdef", ("btcusdt@aggTrade",), "usdm")
    assert Group.from_json(usdm.to_json()) == usdm


def test_usdm_streams_are_grouped_by_route_and_never_join_another_markets_group(redis_client: redis.Redis) -> None:
    registry = GroupRegistry(redis_client, RedisKeys(f"t{uuid.uuid4().hex[:8]}"))
    _, spot = registry.place(["btcusdt@aggTrade"], 1024)
    usdm_streams = stream_names(["BTCUSDT"], ["aggTrade", "markPrice", "depth@100ms", "bookTicker", "forceOrder"])
    _, usdm = registry.place(usdm_streams, 1024, "usdm")
    _, coinm = registry.place(["btcusd_perp@aggTrade", "btcusd_perp@depth@100ms"], 1024, "coinm")

    assert {(g.path, g.streams) for g in usdm} == {
        ("/market/stream", ("btcusdt@aggTrade", "btcusdt@markPrice", "btcusdt@forceOrder")),
        ("/public/stream", ("btcusdt@depth@100ms", "btcusdt@bookTicker")),
    }
    assert [(g.market, g.path) for g in spot + coinm] == [("spot", "/stream"), ("coinm", "/stream")]
    # Later streams join the group of their market and route, the spot group stays as it was.
    grown, new = registry.place(["ethusdt@depth@100ms"], 1024, "usdm")
    assert not new and [g.path for g in grown] == ["/public/stream"]
    assert registry.get(spot[0].id) == spot[0]
    # Unsubscribing a symbol on one market leaves the others' streams of that symbol.
    stopped, _ = registry.remove_symbols(["BTCUSDT"], market="usdm")
    assert sorted(stopped) == sorted(g.id for g in usdm if g.path == "/market/stream")
    assert registry.get(spot[0].id) == spot[0]


def test_futures_connections_go_to_the_route_path() -> None:
    url, _ = split_streams_for_url("ws://127.0.0.1:9/usdm", ["btcusdt@aggTrade"], "/market/stream")
    assert url == "ws://127.0.0.1:9/usdm/market/stream?streams=btcusdt@aggTrade"
