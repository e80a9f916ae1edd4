"""Part 1b, websocket clients: bare receive loops of several websocket libraries against
the same blast server of the whole market's frames, side by side in one run.

The recorder holds its connections with picows (worker/ingest/session.py), chosen by
this part's figures. Which library receives fastest is a question of its receive loop alone:
each library's loop (`bench.receivers.LIBRARIES`: receive, keep the payload as bytes,
discard) runs in a process of its own against `bench.blast --mix market` (trade,
aggTrade, bookTicker and depth@100ms frames of 1,500 symbols in the market load's
proportions and sizes). Every round runs every library once, in an order rotated from
round to round, so that a library is not always first after the blast server's start.

Two figures per library, medians over the rounds:
- frames per second, first frame to last. The blast server writes its whole buffer at
  once and the kernel paces it, so a library much faster than the sender measures the
  sender (its loop then waits: CPU well under the wall time);
- CPU seconds per million frames (user + system, the receiving process's): what the
  library costs the machine, whoever paces it. On 2 cores shared with the fake and the
  drain, this is the figure that decides.
Ratios are taken against websocket-client's loop in the same round (`paired_ratio`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import median, paired_ratio
from bench.ingest import bare_loop
from bench.procs import module_command, service_env, spawn_and_wait
from bench.receivers import LIBRARIES
from worker.ops.local_stack import LocalStack

REFERENCE = "websocket-client"
"""The seed's library, the plain loop that part 1 takes as its ceiling."""


@dataclass(frozen=True)
class ClientSizes:
    frames: int
    rounds: int


FULL_CLIENTS = ClientSizes(frames=300_000, rounds=5)
QUICK_CLIENTS = ClientSizes(frames=20_000, rounds=1)


def measure_clients(workdir: Path, sizes: ClientSizes) -> dict[str, Any]:
    libraries = list(LIBRARIES)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in libraries}
    cpu: dict[str, list[float]] = {name: [] for name in libraries}
    with LocalStack(workdir / "clients", env=service_env()) as stack:
        url = spawn_and_wait(
            stack,
            "blast",
            module_command("bench.blast", "--frames", sizes.frames, "--mix", "market"),
            r"blast listening on (ws://\S+)",
        ).group(1)
        for number in range(sizes.rounds):
            shift = number % len(libraries)
            for name in libraries[shift:] + libraries[:shift]:
                figures = bare_loop(stack, url, sizes.frames, name)
                rates[name].append(figures["frames"] / figures["seconds"])
                cpu[name].append(figures["cpu_seconds"] * 1e6 / figures["frames"])
    return {
        "frames_per_round": sizes.frames,
        "rounds": sizes.rounds,
        "mix": "market",
        "reference": REFERENCE,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "libraries": {
            name: {
                "frames_per_second": median(rates[name]),
                "cpu_seconds_per_million_frames": median(cpu[name]),
                "rate_ratio": paired_ratio(rates[name], rates[REFERENCE]),
                "cpu_ratio": paired_ratio(cpu[name], cpu[REFERENCE]),
                "per_round": {"frames_per_second": rates[name], "cpu_seconds_per_million_frames": cpu[name]},
            }
            for name in libraries
        },
    }
