"""A private PostgreSQL cluster for the tests: initdb in a temporary folder, a free port
on 127.0.0.1, stopped at the end of the session.

It uses the Debian `postgresql` package's programs (`scripts/test` installs the package
when it is missing and the suite runs as root, as in CI). PostgreSQL refuses to run as
root, so as root the cluster runs as the package's `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from worker.ops.local_stack import free_port

INSTALL_HINT = (
    "PostgreSQL's programs (initdb, pg_ctl) were not found: install the Debian package "
    "`postgresql` (scripts/test does so when it runs as root), or put them on PATH"
)


def find_postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: from PATH, else the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(installed[-1]).parent if installed else None


class PostgresServer:
    """One cluster; `url()` names a database in it, `create_database()` makes a fresh one."""

    user = "recorder"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
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
        # Durability settings off: the tests check results, not crash safety of the disk.
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
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
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
