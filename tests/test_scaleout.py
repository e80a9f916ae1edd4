"""Scale-out on one machine (`bench/scaleout.py`, quick size): separate streams and
default worker nodes against one Redis and one PostgreSQL.

Throughput figures are not asserted (a loaded machine makes them flaky; the bench
prints them): what is asserted is that every node came up and recorded, that both
drain configurations emptied a real backlog, and that every trade the fake exchange
sent is in PostgreSQL exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.scaleout import QUICK_SCALEOUT, measure_scaleout


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return measure_scaleout(Path(tmp_path_factory.mktemp("scaleout")), quick=True)


def _node_names(names: list[str]) -> set[str]:
    return {name.split("@", 1)[0] for name in names}


def test_two_streams_nodes_record_three_groups_of_1024_streams(figures: dict[str, Any]) -> None:
    recording = figures["recording"]
    assert recording["groups"] == 3 and figures["streams_per_group"] == [1024, 1024, 1024]
    per_node = {name.split("@", 1)[0]: count for name, count in recording["recording_tasks_per_node"].items()}
    # Two processes per streams node: three groups need both nodes.
    assert per_node.get("streams1", 0) >= 1 and per_node.get("streams2", 0) >= 1, per_node
    assert per_node["streams1"] + per_node["streams2"] == 3
    assert not any(count for name, count in per_node.items() if not name.startswith("streams")), per_node


def test_every_node_answers_ping(figures: dict[str, Any]) -> None:
    assert _node_names(figures["one_drain"]["nodes_answering_ping"]) == {"streams1", "streams2", "default1"}
    assert _node_names(figures["two_drains"]["nodes_answering_ping"]) == {
        "streams1", "streams2", "default1", "default2",
    }  # fmt: skip


@pytest.mark.parametrize(("phase", "nodes", "lanes"), [("one_drain", 1, 1), ("two_drains", 2, 2)])
def test_each_configuration_drains_the_whole_backlog(
    figures: dict[str, Any], phase: str, nodes: int, lanes: int
) -> None:
    figure = figures[phase]
    assert (figure["default_nodes"], figure["drain_lanes"]) == (nodes, lanes)
    target = QUICK_SCALEOUT.backlog_frames
    assert figure["backlog_frames"] >= target
    assert figure["incoming_messages_per_second"] > QUICK_SCALEOUT.rate / 2  # frames kept arriving
    # Caught up: from a backlog of at least `target` down to about one flush round.
    assert figure["caught_up_below_frames"] < target / 2
    assert figure["rows_stored"] > 0 and figure["seconds"] > 0 and figure["rows_per_second"] > 0
    assert figures["ratio"] > 0


def test_every_trade_is_stored_exactly_once(figures: dict[str, Any]) -> None:
    ids = figures["ids"]
    assert ids["streams_checked"] == 3072  # trade and aggTrade of 1,536 symbols
    assert ids["ids_sent"] > 2 * QUICK_SCALEOUT.backlog_frames
    assert ids["missing"] == ids["extra"] == ids["duplicates"] == 0, ids
    assert ids["rows_stored"] == ids["ids_sent"]
    assert ids["lost_nothing"] and ids["stored_once"]
