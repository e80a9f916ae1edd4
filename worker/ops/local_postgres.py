"""PostgreSQL on this machine, for the tests and the benchmark: a private cluster (initdb
in a temporary folder, a free port on 127.0.0.1), and fresh databases on any server.

It uses the Debian `postgresql` package's programs (`scripts/test` installs the package
when it is missing and runs as root, as in CI). PostgreSQL refuses to run as root, so as
root the cluster runs as the package's `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from worker.ops.local_stack import free_port

INSTALL_HINT = (
    "PostgreSQL's programs (initdb, pg_ctl) were not found: install the Debian package "
    "`postgresql` (scripts/test does so when it runs as root), or put them on PATH"
)
DRIVER_HINT = "the PostgreSQL driver psycopg is not installed: pip install -e '.[postgres]'"
CONNECT_TIMEOUT_SECONDS = 5


class PostgresError(RuntimeError):
    """A PostgreSQL server or URL that cannot be used; the message is one line saying why."""


def find_postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: from PATH, else the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(installed[-1]).parent if installed else None


class PostgresServer:
    """One cluster; `url()` names a database in it, `create_database()` makes a fresh one.

    `durable=False` (the tests) turns fsync, synchronous commit and full-page writes off:
    tests check results, not crash safety of the disk. `durable=True` (the benchmark)
    keeps PostgreSQL's defaults, so that commits cost what they cost in production.
    """

    user = "recorder"

    def __init__(self, bin_dir: Path, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        # Not under pytest's tmp_path: that folder is private to root, and the server may
        # run as `postgres`.
        self.directory = Path(tempfile.mkdtemp(prefix="recorder-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.port = free_port()
        self._databases = 0

    def _run(self, *command: str) -> None:
        as_server_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_server_user, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8")
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = self.directory / "server.log"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start")

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database, so that every test starts from nothing."""
        self._databases += 1
        return create_database(self.url(), f"test_{self._databases}")

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_private_server(durable: bool = True) -> PostgresServer:
    """A private cluster, started; PostgresError (one line) when that is impossible."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise PostgresError(INSTALL_HINT)
    server = PostgresServer(bin_dir, durable=durable)
    try:
        server.start()
    except (OSError, subprocess.SubprocessError) as error:
        server.stop()
        detail = getattr(error, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(error)]
        raise PostgresError(f"could not start a private PostgreSQL cluster: {last[0]}") from error
    return server


def psycopg_url(url: str) -> URL:
    """`url` as a SQLAlchemy URL for psycopg 3; `postgresql://` means psycopg too (the
    drain's COPY path needs it). Anything else is a PostgresError."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise PostgresError(f"not a database URL: {url!r}") from None
    if parsed.get_backend_name() != "postgresql":
        raise PostgresError(f"not a PostgreSQL URL: {parsed.render_as_string()} (use postgresql+psycopg://...)")
    if parsed.drivername not in ("postgresql", "postgresql+psycopg"):
        raise PostgresError(f"use the psycopg driver: postgresql+psycopg://..., not {parsed.drivername}://")
    return parsed.set(drivername="postgresql+psycopg")


def connect(url: str | URL, **kwargs: Any) -> Any:
    """A plain psycopg connection to `url` (a SQLAlchemy URL); PostgresError, one line,
    when the driver is missing or the server does not answer."""
    try:
        import psycopg
    except ImportError:
        raise PostgresError(DRIVER_HINT) from None
    parsed = url if isinstance(url, URL) else psycopg_url(url)
    params = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        **{key: value for key, value in parsed.query.items() if isinstance(value, str)},
    }
    conninfo = psycopg.conninfo.make_conninfo("", **{key: value for key, value in params.items() if value is not None})
    try:
        return psycopg.connect(conninfo, **kwargs)
    except psycopg.OperationalError as error:
        where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise PostgresError(f"cannot connect to PostgreSQL at {where}: {reason}") from None


def check_server(url: str) -> str:
    """The URL normalised to postgresql+psycopg://, once a connection to it worked."""
    parsed = psycopg_url(url)
    with connect(parsed) as conn:
        conn.execute("SELECT 1")
    return parsed.render_as_string(hide_password=False)


def create_database(url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `url` (connecting to url's database);
    returns its URL. The user needs the CREATEDB privilege."""
    parsed = psycopg_url(url)
    with connect(parsed, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except Exception as error:
            raise PostgresError(f"cannot create database {name}: {' '.join(str(error).split())}") from None
    return parsed.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, name: str) -> None:
    """DROP DATABASE `name` on the server of `url`, closing its connections first."""
    with connect(psycopg_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
