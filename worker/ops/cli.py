"""`binance-recorder`: run the stack locally, subscribe, watch it, and work with what it recorded.

Exit codes: 0 success, 1 something is unhealthy or a task failed (for `stop`: a process
would not die), 2 bad usage or bad input (argparse's convention) or a bad setting, 3 a
part of the stack could not start (or another `run` uses the data directory), 141 the
reader of the output went away (`| head`), as for any command killed by SIGPIPE; `run`
stops its whole stack first. Every error is one line on stderr, `error: ...`, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import redis
import requests
from celery.exceptions import TimeoutError as CeleryTimeout

from worker.ops.cli_data import add_data_commands
from worker.ops.clients import TaskFailed, call_task, database, existing_database, redis_client
from worker.ops.local_stack import LocalStack, StackError, wait_for_redis
from worker.ops.stack_record import StackRecord, recorded_stack_env, stop_stack
from worker.settings import Settings, split_list
from worker.streams import MARKETS, SPOT, market_named

DEFAULT_LOCAL_SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT"
# Not 9808, the port of the widely used celery-exporter: a Celery shop that scrapes its
# queues with it may run both exporters on one host.
DEFAULT_METRICS_PORT = 9836
MARKET_CHOICES = "|".join(MARKETS)
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
EXIT_STACK = 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def binance_reachable(rest_url: str) -> bool:
    try:
        return requests.get(f"{rest_url.rstrip('/')}/api/v3/ping", timeout=3).ok
    except requests.RequestException:
        return False


# -- run -------------------------------------------------------------------------------


class RunOutput:
    """Where `run` writes its lines: stdout, which may go away while the stack runs.

    `| head` exits, `| tee` dies of the Ctrl-C first, the terminal closes: the next
    write fails (EPIPE, or EIO on a hung-up terminal). That must not cut the cleanup
    short, so a failed write is swallowed, later lines go to /dev/null, and `gone`
    tells the run to stop its stack.
    """

    def __init__(self) -> None:
        self.gone = False

    def say(self, line: str, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        try:
            print(line, file=stream, flush=True)
        except OSError:
            self.gone = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    def closed(self) -> bool:
        """Whether stdout's reader went away, before anything is written to it (pipes, terminals)."""
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        self.gone = self.gone or any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
        return self.gone


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def cmd_run(args: argparse.Namespace) -> int:
    settings = args.settings
    symbols = split_list(args.symbols or settings.startup_symbols or DEFAULT_LOCAL_SYMBOLS)
    output = RunOutput()
    stop_signal: list[int] = []
    for sig in STOP_SIGNALS:  # Ctrl-C, `kill`, `binance-recorder stop`, a closed terminal
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup` ignores SIGHUP: so do we
            signal.signal(sig, lambda received, _: stop_signal.append(received))
    stack = LocalStack(Path(args.data_dir))
    code = 0
    try:
        _stop_leftovers(stack.data_dir, output)
        redis_url = _start_services(stack, settings, args, output)
        result = call_task(redis_url, "tasks.subscribe", [symbols, split_list(args.streams) or None], 60)
        output.say(
            f"recording {', '.join(result['symbols'])} in {len(result['groups'])} group(s): "
            f"{', '.join(result['streams'])}"
        )
        _watch(stack, args, output, lambda: bool(stop_signal) or output.closed())
    except StackError as error:
        output.say(f"error: {error}", sys.stderr)
        code = EXIT_STACK
    finally:
        if stack.processes:
            output.say("stopping ...")
        stack.stop()
    return EXIT_BROKEN_PIPE if output.gone else code


def _stop_leftovers(data_dir: Path, output: RunOutput) -> None:
    """Stop what a killed run left in data_dir, saying so in one line; refuse to start beside a live run."""
    record = StackRecord.load(data_dir)
    if record is None:
        return
    if record.owner.running():
        raise StackError(
            f"a binance-recorder run (pid {record.owner.pid}) already uses {data_dir}: "
            f"stop it first (Ctrl-C there, or `binance-recorder stop --data-dir {data_dir}`)"
        )
    stopped, stuck = stop_stack(record, data_dir)
    if stopped:
        output.say(stopped)
    if stuck:
        raise StackError(f"{', '.join(stuck)} of the earlier run would not stop: kill them, then run again")


def _start_services(stack: LocalStack, settings: Settings, args: argparse.Namespace, output: RunOutput) -> str:
    if "REDIS_URL" in os.environ:
        redis_url = os.environ["REDIS_URL"]
        wait_for_redis(redis_url, timeout=10)
    else:
        redis_url = stack.start_redis(args.redis_port)
    output.say(f"redis:    {redis_url}")
    if args.exchange == "fake" or (args.exchange == "auto" and not binance_reachable(settings.binance_rest_url)):
        base = stack.start_fake_exchange()
        output.say(f"exchange: bundled fake exchange at {base} (Binance is not reachable or --exchange fake)")
    else:
        output.say(f"exchange: {settings.binance_ws_url} and {settings.binance_rest_url}")
        for market in MARKETS:
            prefix = "BINANCE" if market == SPOT else f"BINANCE_{market.upper()}"
            stack.env.setdefault(f"{prefix}_REST_URL", settings.rest_url(market))
            stack.env.setdefault(f"{prefix}_WS_URL", settings.ws_url(market))
        stack.env.setdefault("BINANCE_ARCHIVE_URL", settings.binance_archive_url)
    stack.start_workers(settings.stream_worker_concurrency)
    stack.start_beat()
    names = ["worker-streams", "worker"]
    if args.flower_port:
        output.say(f"flower:   {stack.start_flower(args.flower_port)}")
    if args.metrics_port:
        output.say(f"metrics:  {stack.start_metrics(args.metrics_port)}")
    stack.wait_for_workers(names)
    output.say(f"database: {stack.env['DATABASE_URL']}\nlogs:     {stack.log_dir}/")
    output.say(f"shells:   binance-recorder in {Path.cwd()} uses this stack (URLs in {stack.record()})")
    return redis_url


def _watch(stack: LocalStack, args: argparse.Namespace, output: RunOutput, stopping: Any) -> None:
    """Print row counts every few seconds until stopped, or until --duration passed.

    Meanwhile a worker, beat or Flower that dies is started again (`LocalStack.supervise`).
    """
    from worker.ops.status import table_statuses
    from worker.store.storage import make_engine

    engine = make_engine(stack.env["DATABASE_URL"])
    started = time.monotonic()
    next_report = started + args.report_every
    while not stopping():
        for line in stack.supervise():
            output.say(line)
        if args.duration and time.monotonic() - started >= args.duration:
            return
        if time.monotonic() >= next_report:
            next_report += args.report_every
            counts = {name: t["rows"] for name, t in table_statuses(engine).items() if t["rows"]}
            output.say("rows: " + (", ".join(f"{k}={v}" for k, v in counts.items()) or "none yet"))
        time.sleep(0.2)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the stack recorded in the data directory, whether its `run` still runs or was killed."""
    data_dir = Path(args.data_dir).resolve()
    record = StackRecord.load(data_dir)
    stopped, stuck = stop_stack(record, data_dir) if record is not None else ("", [])
    if stuck:
        print(f"error: {', '.join(stuck)} would not stop: kill them by hand", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(stopped or f"no stack running in {data_dir}")
    return 0


# -- subscribe / unsubscribe / status ------------------------------------------------------


def _market(args: argparse.Namespace) -> str:
    """The --market asked for, checked here: a typo is one line and exit 2, before any task."""
    return market_named(args.market).name


def cmd_subscribe(args: argparse.Namespace) -> int:
    settings = args.settings
    result = call_task(settings.redis_url, "tasks.subscribe", _subscribe_args(args), args.timeout)
    print(json.dumps(result, indent=2))
    if result.get("warning"):
        print(f"warning: {', '.join(result['waiting'])} not recording yet: {result['warning']}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return 0


def _symbols_or_all(args: argparse.Namespace) -> list[str]:
    """The symbols named, or `["*"]` for --all (the whole market); not both, not neither."""
    if args.all and args.symbols:
        raise ValueError(f"--all means every symbol: drop the symbols ({' '.join(args.symbols)}) or --all")
    if not args.all and not args.symbols:
        raise ValueError("name the symbols (BTCUSDT ETHUSDT), or --all for the whole market")
    return ["*"] if args.all else list(args.symbols)


def _subscribe_args(args: argparse.Namespace) -> list[Any]:
    """tasks.subscribe's arguments; --quote narrows --all only."""
    symbols, streams, market = _symbols_or_all(args), split_list(args.streams) or None, _market(args)
    if args.quote and not args.all:
        raise ValueError("--quote narrows --all: add --all, or name the symbols instead")
    if args.all:
        return [symbols, streams, market, [quote.upper() for quote in split_list(args.quote)]]
    return [symbols, streams, market]


def cmd_unsubscribe(args: argparse.Namespace) -> int:
    settings = args.settings
    result = call_task(settings.redis_url, "tasks.unsubscribe", [_symbols_or_all(args), _market(args)], args.timeout)
    print(json.dumps(result, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.ops.report import render_status
    from worker.ops.status import collect_status, problems

    settings = args.settings
    market = _market(args) if args.market else None
    snapshot = collect_status(settings, redis_client(settings), existing_database(settings), market)
    found = problems(snapshot, settings)
    if args.json:
        print(json.dumps({**snapshot, "healthy": not found, "problems": found}, indent=2))
    else:
        print(render_status(snapshot, found))
    return EXIT_UNHEALTHY if found else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve /metrics until SIGINT or SIGTERM (see worker/ops/metrics.py)."""
    from worker.ops.metrics import serve

    settings = args.settings
    client = redis_client(settings)
    client.ping()  # an unreachable Redis is one line now, not an empty page at every scrape
    engine = database(settings)
    # Blocked before the server's thread starts, which inherits the mask: sigwait gets them all.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = serve(settings, client, engine, args.port, args.address)
    except OSError as error:
        print(
            f"error: cannot listen on {args.address}:{args.port} ({error.strerror}): pass a free --port",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"metrics: serving http://{args.address}:{server.server_port}/metrics", flush=True)
    signal.sigwait(stop_signals)
    server.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binance-recorder", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run Redis, workers, beat and Flower locally and record",
        description="Start the whole service locally and record until Ctrl-C.",
    )
    run.add_argument(
        "--symbols",
        default="",
        help=f"comma-separated symbols to record (default: STARTUP_SYMBOLS, else {DEFAULT_LOCAL_SYMBOLS})",
    )
    run.add_argument("--streams", default="", help="comma-separated stream kinds (default: DEFAULT_STREAMS)")
    run.add_argument(
        "--exchange",
        choices=["auto", "binance", "fake"],
        default="auto",
        help="auto: Binance if reachable, else the bundled fake exchange (default: auto)",
    )
    run.add_argument("--data-dir", default="data", help="database, Redis files and logs (default: ./data)")
    run.add_argument(
        "--redis-port",
        type=int,
        default=6379,
        help="port of the private Redis started when REDIS_URL is not set (default: 6379)",
    )
    run.add_argument("--flower-port", type=int, default=5555, help="Flower's port; 0 to not start it")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"port of the Prometheus exporter (/metrics); 0 to not start it (default: {DEFAULT_METRICS_PORT})",
    )
    run.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: never)")
    run.add_argument("--report-every", type=float, default=10, help="seconds between row-count lines")
    run.set_defaults(func=cmd_run)

    stop = commands.add_parser(
        "stop",
        help="stop the stack a `run` started (or left behind when it was killed)",
        description="Stop the stack recorded in DATA_DIR/stack.json: its `run`, or what a killed run left. "
        "Exit 0 stopped (or nothing was running), 1 a process would not stop.",
    )
    stop.add_argument("--data-dir", default="data", help="the data directory of the run (default: ./data)")
    stop.set_defaults(func=cmd_stop)

    for name, func, text in (
        ("subscribe", cmd_subscribe, "start recording symbols"),
        ("unsubscribe", cmd_unsubscribe, "stop recording symbols"),
    ):
        sub = commands.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]} (needs a running worker).")
        sub.add_argument("symbols", nargs="*", help="symbols such as BTCUSDT (USDⓈ-M), BTCUSD_PERP (COIN-M)")
        sub.add_argument("--market", default=SPOT, help=f"{MARKET_CHOICES} (default: spot)")
        sub.add_argument(
            "--all",
            action="store_true",
            help="every symbol the market lists as TRADING, following new listings and delistings"
            if name == "subscribe"
            else "the whole market: its market subscription and every group of it",
        )
        if name == "subscribe":
            sub.add_argument("--streams", default="", help="comma-separated stream kinds (default: DEFAULT_STREAMS)")
            sub.add_argument("--quote", default="", help="with --all: only symbols quoted in these (USDT,FDUSD)")
        sub.add_argument("--timeout", type=float, default=30, help="seconds to wait for the worker's answer")
        sub.set_defaults(func=func)

    status = commands.add_parser(
        "status",
        help="groups, buffers, tables, dead letters; exit 1 when unhealthy",
        description="Show the service's health from Redis and the database (no worker needed). "
        "Exit 0 healthy, 1 unhealthy (the problems are listed), 2 bad input.",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--market", default="", help=f"show only the groups of one market: {MARKET_CHOICES}")
    status.set_defaults(func=cmd_status)

    metrics = commands.add_parser(
        "metrics",
        help="serve the recorder's figures for Prometheus at /metrics",
        description="Serve /metrics for Prometheus: each scrape reads the service's state from Redis and the "
        "database (no worker needed). Runs until Ctrl-C or SIGTERM.",
    )
    metrics.add_argument(
        "--port", type=int, default=DEFAULT_METRICS_PORT, help=f"port to listen on (default: {DEFAULT_METRICS_PORT})"
    )
    metrics.add_argument(
        "--address", default="127.0.0.1", help="address to listen on; 0.0.0.0 in a container (default: 127.0.0.1)"
    )
    metrics.set_defaults(func=cmd_metrics)

    add_data_commands(commands)
    return parser


def _attach_relative_times(argv: Sequence[str]) -> list[str]:
    """`--start -2h` (or `--at -10s`, `--day -1d`) reads as two options to argparse; make it `--start=-2h`."""
    result: list[str] = []
    for arg in argv:
        if result and result[-1] in ("--start", "--end", "--at", "--day") and re.fullmatch(r"-\d+(\.\d+)?[smhdw]", arg):
            result[-1] = f"{result[-1]}={arg}"
        else:
            result.append(arg)
    return result


def load_settings(command: str) -> Settings:
    """The settings, checked once for every command.

    Commands other than `run` also take the URLs a running `binance-recorder run`
    recorded under ./data/ (the fake exchange's port, a non-default Redis port), unless
    the environment sets them.
    """
    recorded = {} if command == "run" else recorded_stack_env(Path("data"))
    return Settings.from_env({**recorded, **os.environ})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_relative_times(sys.argv[1:] if argv is None else argv))
    try:
        args.settings = load_settings(args.command)
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a broken pipe is caught, not at the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except TaskFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE if error.bad_input else EXIT_UNHEALTHY
    except CeleryTimeout:
        print(
            "error: no worker answered in time: is `celery -A worker worker` running against the same REDIS_URL?",
            file=sys.stderr,
        )
        return EXIT_UNHEALTHY
    except ValueError as error:  # bad symbols, stream kinds, settings: the message says which
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except redis.ConnectionError as error:
        print(f"error: cannot reach Redis ({error}): start it or set REDIS_URL", file=sys.stderr)
        return EXIT_UNHEALTHY
    except Exception as error:  # anything else still gets one line, with its type to search for
        message = " ".join(str(error).split())
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
