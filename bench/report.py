"""The verdicts against the targets, and the table printed at the end of a run."""

from __future__ import annotations

from typing import Any

from bench.depth import DEPTH_PARTS

Row = tuple[str, ...]

INGEST_RATIO = 1.0
"""Part 1: the recorder against the bare websocket-client loop; issue 19 asks for 1.0 in every full run."""
DRAIN_RATIO = {"sqlite": 0.45, "postgresql": 0.5}
"""The drain against its backend's plain bulk path: executemany (SQLite), COPY (PostgreSQL)."""
REFERENCE_NAMES = {"executemany": "executemany", "copy": "COPY"}
DATABASE_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
LATENCY_P99_MS = 250.0
BURST_RATIO = 2.0
MEMORY_GROWTH = 0.10
DEPTH_EVENTS_PER_SECOND = 2000
REBUILD_SECONDS_PER_HOUR = 10.0
REPLAY_RATIO = 0.5
FIRST_FRAME_SECONDS = 2.0
MARKET_RECORDER_ROLES = ("streams process", "drain process")
"""The market part's processes held to the memory target; the others are shown."""


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured value and whether it is met (parts not run: absent)."""
    verdicts: dict[str, dict[str, Any]] = {}
    if "ingest" in results:
        verdicts["ingest"] = _at_least(results["ingest"]["ratio"], INGEST_RATIO, "recorder / bare receive loop")
    if "drain" in results:
        drain = results["drain"]
        backend = _backend(drain)
        reference = REFERENCE_NAMES[drain.get("reference", "executemany")]
        verdicts["drain"] = _at_least(
            drain["ratio"], DRAIN_RATIO[backend], f"drainer / plain {reference} ({DATABASE_LABELS[backend]})"
        )
    if "end_to_end" in results:
        verdicts["end_to_end"] = _at_most(results["end_to_end"].get("p99_ms"), LATENCY_P99_MS, "p99 latency, ms")
        memory = results["memory"]
        growth = max(_growth(memory["subscription_task"]), _growth(memory["drain"]))
        verdicts["memory"] = _at_most(growth, MEMORY_GROWTH, "largest RSS growth over the run")
    if "scale" in results:
        scale = results["scale"]
        verdicts["scale_latency"] = _at_most(scale["latency"].get("p99_ms"), LATENCY_P99_MS, "p99 latency, ms")
        verdicts["scale_ids"] = {
            "what": "every id sent stored exactly once",
            "value": scale["ids"]["missing"],
            "met": scale["ids"]["lost_nothing"],
        }
    if "burst" in results:
        verdicts["burst"] = _at_most(results["burst"]["ratio"], BURST_RATIO, "burst stored / bare receive loop")
    for part in DEPTH_PARTS:
        if part in results:
            verdicts.update(_depth_targets(part, results[part]))
    if "replay" in results:
        verdicts.update(_replay_targets(results["replay"]))
    if "market" in results:
        verdicts.update(_market_targets(results["market"]))
    return verdicts


def _replay_targets(replay: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 18's: frames/s at max speed against the blast server, and the first frame
    from the command's start (until it listens, then from the client's connection)."""
    first = replay["first_frame"]
    return {
        "replay_throughput": _at_least(replay["throughput"]["ratio"], REPLAY_RATIO, "replay at max / blast server"),
        "replay_first_frame": _at_most(
            _first_frame_seconds(first) - first["imports_seconds"],
            FIRST_FRAME_SECONDS,
            "seconds from the command to the first frame, less the interpreter's start and imports",
        ),
    }


def _depth_targets(part: str, depth: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`<part>_capacity`, `_latency` and `_rebuild`: the same targets for spot's and USDⓈ-M's books."""
    rebuild = depth["rebuild"]
    return {
        f"{part}_capacity": _at_least(
            depth["drain_capacity"]["rows_per_second"], DEPTH_EVENTS_PER_SECOND, "depth rows/s the drain takes"
        ),
        f"{part}_latency": _at_most(depth["sustained"]["latency"].get("p99_ms"), LATENCY_P99_MS, "p99 latency, ms"),
        f"{part}_rebuild": _at_most(
            rebuild["book_at_seconds"] / rebuild["replayed_hours"],
            REBUILD_SECONDS_PER_HOUR,
            "seconds per hour replayed",
        ),
    }


def _market_targets(market: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 19's targets for the whole market: p99 per kind, nothing lost or doubled,
    resident sizes flat."""
    verdicts = {
        f"market_latency_{kind}": _at_most(figures.get("p99_ms"), LATENCY_P99_MS, f"{kind} p99 latency, ms")
        for kind, figures in market["latency"].items()
    }
    ids = market["ids"]
    verdicts["market_ids"] = {
        "what": "trade and aggTrade ids sent: missing + stored twice",
        "value": ids["missing"] + ids["duplicates"],
        "met": ids["missing"] == ids["duplicates"] == 0 and ids["ids_sent"] > 0,
    }
    recorder = [track for track in market["memory"] if track["role"] in MARKET_RECORDER_ROLES and track["processes"]]
    growth = max((_growth(track) for track in recorder), default=float("inf"))
    verdicts["market_memory"] = _at_most(growth, MEMORY_GROWTH, "largest RSS growth of a streams or drain process")
    return verdicts


def _backend(section: dict[str, Any]) -> str:
    """The database a part stored into (results written before there was a choice: SQLite)."""
    return str(section.get("database", "sqlite"))


def _growth(track: dict[str, Any]) -> float:
    return track["max_growth"] if track["max_growth"] is not None else float("inf")


def _at_least(value: float, target: float, what: str) -> dict[str, Any]:
    return {"what": what, "value": value, "target": f">= {target:g}", "met": value >= target}


def _at_most(value: float | None, target: float, what: str) -> dict[str, Any]:
    return {"what": what, "value": value, "target": f"<= {target:g}", "met": value is not None and value <= target}


def table(results: dict[str, Any]) -> str:
    """One row per figure; the `db` column says which database the figure is for."""
    rows: list[Row] = [("part", "db", "measure", "value", "reference", "target", "met")]
    verdicts = results.get("targets", {})
    sqlite = DATABASE_LABELS["sqlite"]

    def add(database: str, *part_rows: Row) -> None:
        rows.extend((row[0], database, *row[1:]) for row in part_rows)

    if "ingest" in results:
        add("-", _ingest_row(results["ingest"], verdicts["ingest"]))
    if "clients" in results:
        add("-", *_client_rows(results["clients"]))
    if "drain" in results:
        add(DATABASE_LABELS[_backend(results["drain"])], _drain_row(results["drain"], verdicts["drain"]))
    if "end_to_end" in results:
        service = DATABASE_LABELS[_backend(results["end_to_end"])]
        add(service, _latency_row("end to end", results["end_to_end"], verdicts["end_to_end"]))
        add(service, *_memory_rows(results["memory"], verdicts["memory"]))
        add(service, *_cpu_rows(results["drain_cpu"]))
    if "scale" in results:
        add(DATABASE_LABELS[_backend(results["scale"])], *_scale_rows(results["scale"], verdicts))
    if "burst" in results:
        add(sqlite, _burst_row(results["burst"], verdicts["burst"]))
    if "legacy" in results:
        add(sqlite, *_legacy_rows(results["legacy"], results.get("ingest")))
    for part in DEPTH_PARTS:
        if part in results:
            add(sqlite, *_depth_rows(part, results[part], verdicts))
    if "replay" in results:
        add(sqlite, *_replay_rows(results["replay"], verdicts))
    if "market" in results:
        add(sqlite, *_market_rows(results["market"], verdicts))
    return _format(rows)


def _first_frame_seconds(first: dict[str, Any]) -> float:
    """From starting `binance-recorder replay` until it listens, then from the client's connection."""
    return float(first["command_to_listening_seconds"] + first["connect_to_first_frame_seconds"])


def _replay_rows(replay: dict[str, Any], verdicts: dict[str, Any]) -> list[Row]:
    throughput, first = replay["throughput"], replay["first_frame"]
    return [
        _ratio_row(
            "9 replay",
            f"frames/s at --speed max to the bare loop, {throughput['streams']} streams",
            f"{throughput['replay_frames_per_second']:,.0f} ({throughput['replay_cpu_us_per_frame']:.1f} us CPU/frame)",
            f"blast {throughput['blast_frames_per_second']:,.0f}",
            verdicts["replay_throughput"],
        ),
        (
            "9 replay",
            f"first frame, {first['start_after_hour_start_seconds']:g} s into {first['recorded_seconds']:,} s "
            f"of {first['symbols']} symbols' depth@100ms",
            f"{_first_frame_seconds(first):.2f} s, less imports {verdicts['replay_first_frame']['value']:.2f} s",
            f"listening at {first['command_to_listening_seconds']:.2f} s, imports {first['imports_seconds']:.2f} s",
            f"{verdicts['replay_first_frame']['target']} s",
            _yes(verdicts["replay_first_frame"]),
        ),
        (
            "9 replay",
            f"then depth frames/s; the {first['symbols']} books at the clock (/api/v3/depth)",
            f"{first['depth_frames_per_second']:,.0f}",
            f"books in {first['books_seconds']:.2f} s",
            "",
            "",
        ),
    ]


def _ingest_row(ingest: dict[str, Any], verdict: dict[str, Any]) -> Row:
    return _ratio_row(
        "1 ingest",
        f"frames/s socket->Redis, 1 task, {ingest['streams']} streams",
        f"{ingest['recorder_frames_per_second']:,.0f}",
        f"bare loop {ingest['bare_loop_frames_per_second']:,.0f}",
        verdict,
    )


def _client_rows(clients: dict[str, Any]) -> list[Row]:
    reference = clients["reference"]
    return [
        (
            "1b clients",
            f"{name} bare loop, market mix: frames/s, CPU s per 1M frames",
            f"{figures['frames_per_second']:,.0f} frames/s, {figures['cpu_seconds_per_million_frames']:.2f} s",
            f"x{figures['rate_ratio']:.2f} rate, x{figures['cpu_ratio']:.2f} CPU of {reference}",
            "",
            "",
        )
        for name, figures in clients["libraries"].items()
    ]


def _drain_row(drain: dict[str, Any], verdict: dict[str, Any]) -> Row:
    reference = drain.get("reference", "executemany")
    return _ratio_row(
        "2 drain",
        f"rows/s Redis->{DATABASE_LABELS[_backend(drain)]}, batches of {drain['batch_size']:,}",
        f"{drain['drainer_rows_per_second']:,.0f}",
        f"{REFERENCE_NAMES[reference]} {drain[f'{reference}_rows_per_second']:,.0f}",
        verdict,
    )


def _burst_row(burst: dict[str, Any], verdict: dict[str, Any]) -> Row:
    return _ratio_row(
        "3b burst",
        f"{burst['frames']:,} frames at once, 1 subscription: all stored",
        f"{burst['recorder_seconds']:.2f} s (all in Redis at {burst['received_seconds']:.2f} s)",
        f"bare loop {burst['bare_loop_seconds']:.2f} s",
        verdict,
    )


def _ratio_row(part: str, measure: str, value: str, reference: str, verdict: dict[str, Any]) -> Row:
    return (part, measure, value, reference, f"{verdict['value']:.3f} {verdict['target']}", _yes(verdict))


def _latency_row(part: str, figures: dict[str, Any], verdict: dict[str, Any]) -> Row:
    return (
        f"3 {part}",
        (
            f"event->committed at {figures['offered_messages_per_second']:,.0f} msg/s, "
            f"drain every {figures['drain_interval_seconds']:g} s"
        ),
        _latency_text(figures),
        f"{figures.get('samples', 0):,} rows",
        f"p99 {verdict['target']} ms",
        _yes(verdict),
    )


def _latency_text(figures: dict[str, Any]) -> str:
    if not figures.get("samples"):
        return "no rows"
    text = f"p50 {figures['p50_ms']:.0f} / p99 {figures['p99_ms']:.0f} / max {figures['max_ms']:.0f} ms"
    received = figures.get("event_to_receive", {})
    return text + (f" (received: p99 {received['p99_ms']:.0f})" if received.get("samples") else "")


def _memory_rows(memory: dict[str, Any], verdict: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for key in ("subscription_task", "drain"):
        track = memory[key]
        for process in track["processes"]:
            rows.append(
                (
                    "4 memory",
                    f"RSS of the {track['role']} process ({process['pid']})",
                    f"{process['start_kb'] / 1024:.1f} -> {process['end_kb'] / 1024:.1f} MiB",
                    f"over {memory['seconds']:g} s",
                    f"{process['growth']:+.1%} (<= {MEMORY_GROWTH:.0%})",
                    _yes(verdict),
                )
            )
    return rows


def _cpu_rows(cpu: dict[str, Any]) -> list[Row]:
    loaded = cpu["loaded"]
    cases = [("nothing subscribed", cpu["idle"]), (f"at {loaded['offered_messages_per_second']:,.0f} msg/s", loaded)]
    return [
        ("4 cpu", f"default worker (drain) CPU, {case}", f"{figures['cpu_share']:.1%} of a core",
         f"over {figures['seconds']:.0f} s", "", "")
        for case, figures in cases
    ]  # fmt: skip


def _scale_rows(scale: dict[str, Any], verdicts: dict[str, Any]) -> list[Row]:
    groups = scale["streams_per_group"]
    ids = scale["ids"]
    latency = {
        **scale["latency"],
        "offered_messages_per_second": scale["offered_messages_per_second"],
        "drain_interval_seconds": scale["drain_interval_seconds"],
    }
    return [
        (
            "5 scale",
            (
                f"{len(groups)} groups of {'+'.join(map(str, groups))} streams, "
                f"{scale['offered_messages_per_second']:,.0f} msg/s"
            ),
            _latency_text(latency),
            f"{latency.get('samples', 0):,} rows",
            f"p99 {verdicts['scale_latency']['target']} ms",
            _yes(verdicts["scale_latency"]),
        ),
        (
            "5 scale",
            f"ids sent vs stored, {ids['streams_checked']:,} streams (both phases)",
            f"{ids['missing']} missing, {ids['extra']} extra, {ids['duplicates']} twice",
            f"{ids['ids_sent']:,} ids sent",
            "nothing lost",
            _yes(verdicts["scale_ids"]),
        ),
    ]


def _legacy_rows(legacy: dict[str, Any], ingest: dict[str, Any] | None) -> list[Row]:
    at_target = legacy["at_target"]
    reference = f"recorder {ingest['recorder_frames_per_second']:,.0f}" if ingest else ""
    return [
        (
            "6 old design",
            "msg/s, INSERT+COMMIT per message",
            f"{legacy['sustainable_messages_per_second']:,.0f}",
            reference,
            "",
            "",
        ),
        (
            "6 old design",
            f"at {at_target['offered_messages_per_second']:,} msg/s for {at_target['seconds']:.0f} s",
            f"stores {at_target['stored_messages_per_second']:,.0f}/s; " + _latency_text(at_target["latency"]),
            f"{at_target['behind_at_stop_messages'] or 0:,} msgs behind at stop",
            "",
            "",
        ),
    ]


def _depth_rows(part: str, depth: dict[str, Any], verdicts: dict[str, Any]) -> list[Row]:
    capacity, sustained, storage, rebuild = (depth[k] for k in ("drain_capacity", "sustained", "storage", "rebuild"))
    # Results saved before the futures part have no market: they are spot's.
    market, table = depth.get("market", "spot"), depth.get("table", "depth_updates")
    label = f"7 {part.replace('_', ' ')}"
    return [
        (
            label,
            f"drain rows/s, {depth['symbols']} {market} symbols depth@100ms, {depth['levels_per_event']} levels/event",
            f"{capacity['rows_per_second']:,.0f}",
            f"{capacity['rows']:,} rows as a backlog",
            verdicts[f"{part}_capacity"]["target"],
            _yes(verdicts[f"{part}_capacity"]),
        ),
        (
            label,
            f"event->committed at {sustained['offered_events_per_second']:,.0f} events/s, "
            "the drain storing as frames arrive",
            _latency_text(sustained["latency"]),
            f"{sustained['latency'].get('samples', 0):,} rows",
            f"p99 {verdicts[f'{part}_latency']['target']} ms",
            _yes(verdicts[f"{part}_latency"]),
        ),
        (
            label,
            f"bytes per symbol-hour of {table} (table + indexes)",
            f"{storage['packed_bytes_per_symbol_hour'] / 2**20:,.1f} MiB packed float64",
            f"{storage['json_bytes_per_symbol_hour'] / 2**20:,.1f} MiB as JSON text",
            "",
            "",
        ),
        (
            label,
            f"book_at after {rebuild['events']:,} events ({rebuild['replayed_hours']:g} h of depth@100ms)",
            f"{rebuild['book_at_seconds']:.2f} s",
            f"decode {rebuild['decode_packed_seconds']:.2f} s packed, {rebuild['decode_json_seconds']:.2f} s JSON",
            f"{verdicts[f'{part}_rebuild']['target']} s/h",
            _yes(verdicts[f"{part}_rebuild"]),
        ),
    ]


def _market_rows(market: dict[str, Any], verdicts: dict[str, Any]) -> list[Row]:
    part = "8 market"
    ids = market["ids"]
    shape = (
        f"{market['symbols']:,} symbols, {market['streams']:,} streams in {market['groups']} groups, "
        f"{market['offered_messages_per_second']:,.0f} msg/s for {market['seconds']:.0f} s"
    )
    rows: list[Row] = [
        (
            part,
            f"{kind} {figures['from']}->committed, {shape}",
            _latency_text(figures),
            f"{figures.get('samples', 0):,} rows",
            f"p99 {verdicts[f'market_latency_{kind}']['target']} ms",
            _yes(verdicts[f"market_latency_{kind}"]),
        )
        for kind, figures in market["latency"].items()
    ]
    rows.append(
        (
            part,
            f"trade and aggTrade ids vs the fake's ledger, {ids['streams_checked']:,} streams",
            f"{ids['missing']} missing, {ids['duplicates']} twice, {ids['extra']} extra",
            f"{ids['ids_sent']:,} ids sent",
            "0 missing, 0 twice",
            _yes(verdicts["market_ids"]),
        )
    )
    breaks = str(market["book_continuity_breaks"])
    rows.append((part, "book continuity breaks (gaps of kind depth)", breaks, "", "", ""))
    cpu = ", ".join(f"{role} {cores:.2f}" for role, cores in market["cpu_cores"].items())
    rows.append((part, "CPU, cores", cpu, f"over {market['seconds']:.0f} s", "", ""))
    for track in market["memory"]:
        judged = track["role"] in MARKET_RECORDER_ROLES  # Redis's size follows its backlog
        for process in track["processes"]:
            rows.append(
                (
                    part,
                    f"RSS of the {track['role']} ({process['pid']})",
                    f"{process['start_kb'] / 1024:.1f} -> {process['end_kb'] / 1024:.1f} MiB",
                    f"{process['growth']:+.1%}",
                    f"<= {MEMORY_GROWTH:.0%}" if judged else "",
                    ("yes" if process["growth"] <= MEMORY_GROWTH else "NO") if judged else "",
                )
            )
    for table_name, stored in market["storage"].items():
        rows.append(
            (
                part,
                f"{table_name}: bytes stored per hour (table + indexes)",
                f"{stored['bytes_per_hour'] / 2**20:,.1f} MiB",
                f"{stored['rows_per_hour']:,.0f} rows, {stored['bytes_per_row']:.0f} B/row",
                "",
                "",
            )
        )
    search = market.get("find_max")
    if search:
        tried = ", ".join(f"{s['rate']:,.0f} {'ok' if s['sustained'] else 'growing'}" for s in search["steps"])
        rows.append(
            (
                part,
                f"highest rate without a growing backlog for {search['step_seconds']:g} s",
                f"{search['highest_sustained_messages_per_second']:,.0f} msg/s",
                tried,
                "",
                "",
            )
        )
    return rows


def _yes(verdict: dict[str, Any]) -> str:
    return "yes" if verdict["met"] else "NO"


def _format(rows: list[Row]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
