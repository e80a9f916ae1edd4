"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The file is validated against the Compose specification's schema, its services are
checked for what the design needs (queues, one beat, real healthchecks, private Redis,
Flower behind a password), and the worker commands and healthchecks are run as
processes against a real Redis, the way the containers would run them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import clean_env, wait_until
from worker.ops.local_stack import LocalStack, free_port
from worker.settings import Settings, documented_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
DATA = "/app/data"

Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    return compose["services"]


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax, as much as this file uses: `$$`, `${VAR}`,
    `${VAR:-default}` and `${VAR:?error}`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        value = env.get(match["name"], "")
        if not value and match["op"] == ":?":
            raise ValueError(match["arg"])
        return value or (match["arg"] if match["op"] == ":-" else "")

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", replace, text)


def celery_services(services: Mapping[str, Service]) -> dict[str, list[str]]:
    return {name: s["command"] for name, s in services.items() if s.get("command", [""])[0] == "celery"}


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# -- the schema ---------------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in compose


@pytest.mark.parametrize(
    ("mistake", "path", "value"),
    [
        ("none (control)", None, None),
        ("misspelt key", ("services", "worker", "stop_grace_perod"), "15s"),
        ("wrong type", ("services", "flower", "ports"), "127.0.0.1:5555:5555"),
    ],
)
def test_the_schema_check_catches_mistakes(
    tmp_path: Path, mistake: str, path: tuple[str, ...] | None, value: Any
) -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    if path:
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(yaml.safe_dump(document))
    result = check_compose_schema(copy)
    assert (result.returncode == 0) == (path is None), result.stdout + result.stderr


def test_every_dollar_is_escaped_or_a_compose_variable() -> None:
    """A bare `$HOSTNAME` would be replaced by the host's value when compose reads the
    file, not by the container's when the command runs."""
    assert re.findall(r"\$[^{]", COMPOSE.read_text().replace("$$", "")) == []


# -- the services ---------------------------------------------------------------------------


def test_every_celery_service_loads_the_app(services: dict[str, Service]) -> None:
    commands = celery_services(services)
    assert set(commands) == {"worker-streams", "worker", "beat", "flower"}
    assert all(command[1:3] == ["-A", "worker"] for command in commands.values())


def test_the_streams_worker(services: dict[str, Service]) -> None:
    service = services["worker-streams"]
    command = service["command"]
    assert command[3] == "worker"
    assert option(command, "-Q") == "streams"
    assert option(command, "--prefetch-multiplier") == "1"
    assert option(command, "-P") == "prefork"
    assert option(command, "-c") == f"${{STREAM_WORKER_CONCURRENCY:-{Settings().stream_worker_concurrency}}}"
    assert seconds(service["stop_grace_period"]) >= 10
    assert service["stop_signal"] == "SIGTERM"


def test_the_default_worker(services: dict[str, Service]) -> None:
    command = services["worker"]["command"]
    assert command[3] == "worker"
    assert option(command, "-Q") == "celery"
    assert seconds(services["worker"]["stop_grace_period"]) >= 10


def test_exactly_one_beat_keeping_its_schedule_in_the_data_volume(
    services: dict[str, Service],
) -> None:
    beats = {name: c for name, c in celery_services(services).items() if c[3] == "beat"}
    assert list(beats) == ["beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert option(beats["beat"], "-s").startswith(f"{DATA}/")


@pytest.mark.parametrize("name", ["worker-streams", "worker"])
def test_worker_healthchecks_ping_their_own_node(services: dict[str, Service], name: str) -> None:
    node = option(services[name]["command"], "-n").replace("%h", "$$HOSTNAME")
    kind, test = services[name]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    assert re.fullmatch(rf"celery -A worker inspect ping -d {re.escape(node)}( --timeout \d+)?", test)


def test_workers_wait_for_a_healthy_redis(services: dict[str, Service]) -> None:
    for name in ("worker-streams", "worker", "beat", "flower"):
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_redis_is_private_durable_and_never_evicts(services: dict[str, Service]) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "ports" not in redis
    assert option(redis["command"], "--appendonly") == "yes"
    assert option(redis["command"], "--maxmemory-policy") == "noeviction"
    assert "ping" in redis["healthcheck"]["test"]
    assert "redis:/data" in redis["volumes"]


def test_named_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, Service]) -> None:
    mounted = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    named = {source for source in mounted if not source.startswith(".")}
    assert named == set(compose["volumes"]) == {"redis", "data", "postgres", "prometheus", "grafana"}
    assert services["postgres"]["volumes"] == ["postgres:/var/lib/postgresql/data"]


def test_every_service_that_opens_the_database_mounts_the_data_volume(
    services: dict[str, Service],
) -> None:
    for name in ("worker-streams", "worker", "beat"):
        assert f"data:{DATA}" in services[name]["volumes"]
        assert services[name]["environment"]["DATABASE_URL"] == f"${{DATABASE_URL:-sqlite:///{DATA}/binance.db}}"


def test_the_postgres_profile(services: dict[str, Service]) -> None:
    """PostgreSQL runs only with the `postgres` profile; every service of the app waits
    for it to be healthy when it runs, and runs without it when it does not."""
    postgres = services["postgres"]
    assert postgres["profiles"] == ["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in postgres
    waiting = {name for name, service in services.items() if "redis" in service.get("depends_on", {})}
    assert waiting == {"worker-streams", "worker", "beat", "flower", "metrics"}  # subscribe waits for the workers
    for name in waiting:
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}, name


def test_flower_asks_for_a_password_and_listens_on_localhost_only(
    services: dict[str, Service],
) -> None:
    flower = services["flower"]
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?" in " ".join(flower["command"])
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_only_the_web_pages_are_published_and_on_localhost_only(services: dict[str, Service]) -> None:
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert set(published) == {"flower", "metrics", "prometheus", "grafana"}
    for name, ports in published.items():
        assert all(port.startswith("127.0.0.1:") for port in ports), name


def test_every_setting_reaches_the_containers(services: dict[str, Service]) -> None:
    environment = services["worker"]["environment"]
    assert set(environment) == {name for name, _, _ in documented_settings()}
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    passed_through = {name for name, value in environment.items() if value is None}
    assert passed_through == set(environment) - {"REDIS_URL", "DATABASE_URL"}
    built_here = {name for name, service in services.items() if service.get("image") == "binance-recorder"}
    assert built_here == {"worker-streams", "worker", "beat", "flower", "metrics", "subscribe"}
    for name in built_here:
        assert services[name]["environment"] == environment, name


# -- metrics and the monitoring profile ---------------------------------------------------------


def metrics_port(services: Mapping[str, Service]) -> str:
    return option(services["metrics"]["command"], "--port")


def test_the_metrics_exporter_runs_with_the_app(services: dict[str, Service]) -> None:
    """Without a profile, like Flower: `binance-recorder metrics` on every address of its
    container, reading the SQLite file of the data volume."""
    metrics = services["metrics"]
    assert "profiles" not in metrics
    assert metrics["command"][:2] == ["binance-recorder", "metrics"]
    assert option(metrics["command"], "--address") == "0.0.0.0"
    assert metrics["ports"] == [f"127.0.0.1:{metrics_port(services)}:{metrics_port(services)}"]
    assert f"data:{DATA}" in metrics["volumes"]
    assert f"127.0.0.1:{metrics_port(services)}/metrics" in " ".join(metrics["healthcheck"]["test"])


def bind_mounts(service: Service) -> dict[str, Path]:
    """Container path -> the repository file or folder mounted there."""
    mounts = [volume.split(":") for volume in service.get("volumes", []) if volume.startswith(".")]
    return {target: (COMPOSE.parent / source).resolve() for source, target, *_ in mounts}


def test_the_monitoring_profile_provisions_prometheus_and_grafana(services: dict[str, Service]) -> None:
    """Prometheus scrapes the exporter's port; Grafana gets that Prometheus (under the uid
    the dashboard names) and the dashboard, from files of the repository that exist."""
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    prometheus_files, grafana_files = bind_mounts(prometheus), bind_mounts(grafana)
    assert all(path.exists() for path in [*prometheus_files.values(), *grafana_files.values()])

    config = yaml.safe_load(prometheus_files["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"metrics:{metrics_port(services)}"]}]

    provisioning = grafana_files["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "binance-recorder.yml").read_text())["providers"]
    dashboards = grafana_files[provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    dashboard = json.loads((dashboards / Path(home).name).read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used == {source["uid"]}


def test_the_metrics_command_serves_what_its_healthcheck_reads(
    services: dict[str, Service], redis_url: str, tmp_path: Path
) -> None:
    """The exporter's compose command, run as a process (on a free port: the one in the
    file may be taken here), answers its healthcheck; stopped, the healthcheck fails."""
    port = str(free_port())
    env = clean_env({"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'binance.db'}"})
    stack = LocalStack(tmp_path, env=env)
    command = [part.replace(metrics_port(services), port) for part in services["metrics"]["command"]]
    healthcheck = [part.replace(metrics_port(services), port) for part in services["metrics"]["healthcheck"]["test"]]
    assert healthcheck[0] == "CMD"
    try:
        exporter = stack.spawn("metrics", [str(BIN / command[0]), *command[1:]])
        wait_until(lambda: "serving" in exporter.log_text(), 30, "the exporter to listen")
        assert subprocess.run([sys.executable, *healthcheck[2:]], timeout=30).returncode == 0
        stack.stop_process(exporter)
        assert subprocess.run([sys.executable, *healthcheck[2:]], capture_output=True, timeout=30).returncode != 0
    finally:
        stack.stop()


# -- the Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")
    ]


def test_the_dockerfile() -> None:
    instructions = dockerfile_instructions()

    def values(name: str) -> list[str]:
        return [args for instruction, args in instructions if instruction == name]

    assert values("FROM") == ["python:3.11-slim"]
    assert values("WORKDIR") == ["/app"]
    assert any('pip install --no-cache-dir ".[postgres]"' in run for run in values("RUN"))
    assert any("PYTHONUNBUFFERED=1" in env for env in values("ENV"))
    assert values("USER") and values("USER")[-1] not in {"root", "0"}
    assert json.loads(values("VOLUME")[-1]) == [DATA]
    for name in ("CMD", "ENTRYPOINT"):
        for args in values(name):
            assert isinstance(json.loads(args), list), f"{name} must be exec form: {args}"
    assert values("CMD"), "a default command"


def test_the_build_context_leaves_out_local_state_and_secrets() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env", "data/", "bench/results/", ".pytest_cache/"} <= ignored


# -- the commands, run --------------------------------------------------------------------


def run_shell(command: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command],
        check=False,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_worker_commands_start_workers_their_healthchecks_see(services: dict[str, Service], tmp_path: Path) -> None:
    """Each worker runs its compose command; its healthcheck, run as Docker would
    (HOSTNAME is the container's host name), reaches that worker and no other."""
    stack = LocalStack(tmp_path, env=clean_env({"STREAM_WORKER_CONCURRENCY": "2"}))
    env = {
        **stack.env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOSTNAME": socket.gethostname(),
    }
    try:
        stack.start_redis()
        for name in ("worker-streams", "worker"):
            command = [interpolate(part, stack.env) for part in services[name]["command"]]
            stack.spawn(name, [sys.executable, "-m", *command])
        stack.wait_for_workers(["worker-streams", "worker"])
        env["REDIS_URL"] = stack.env["REDIS_URL"]
        for name in ("worker-streams", "worker"):
            healthcheck = interpolate(services[name]["healthcheck"]["test"][1], env)
            result = run_shell(healthcheck, env)
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        stack.stop_process(stack.process("worker"))
        result = run_shell(interpolate(services["worker"]["healthcheck"]["test"][1], env), env)
        assert result.returncode != 0, "the healthcheck of a stopped worker must fail"
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("symbols", "arguments"),
    [
        (None, None),
        ("", None),
        ("BTCUSDT,ETHUSDT", "subscribe BTCUSDT ETHUSDT"),
        ("BTCUSDT, ETHUSDT BNBUSDT", "subscribe BTCUSDT ETHUSDT BNBUSDT"),
    ],
)
def test_the_subscribe_one_shot(
    services: dict[str, Service], tmp_path: Path, symbols: str | None, arguments: str | None
) -> None:
    """It subscribes STARTUP_SYMBOLS, one argument per symbol, and succeeds when there
    are none. A stand-in `binance-recorder` records its arguments."""
    record = tmp_path / "called"
    stand_in = tmp_path / "binance-recorder"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    if symbols is not None:
        env["STARTUP_SYMBOLS"] = symbols
    program, flag, script = services["subscribe"]["command"]
    assert (program, flag) == ("sh", "-c")
    result = run_shell(interpolate(script, {}), env)
    assert result.returncode == 0, result.stderr
    assert (record.read_text().strip() if record.exists() else None) == arguments
    assert services["subscribe"]["restart"] == "no"
    assert set(services["subscribe"]["depends_on"]) == {"worker", "worker-streams"}
