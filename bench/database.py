"""Where the parts that store rows store them: SQLite files (the default), or fresh
databases on the PostgreSQL server of `--database-url` (or of `--postgres`).

On PostgreSQL every round gets a database of its own (CREATE DATABASE on the server of
the URL, whose own database is only connected to for that), dropped when the run ends:
the benchmark never touches the tables of the database the URL names.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url

from worker.ops.local_postgres import create_database, drop_database

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
LABELS = {SQLITE: "SQLite", POSTGRESQL: "PostgreSQL"}


class Databases:
    """Fresh, empty databases of one backend, one per call of `fresh`."""

    def __init__(self, server_url: str | None = None) -> None:
        self.server_url = server_url
        self.backend = POSTGRESQL if server_url else SQLITE
        self._created: list[str] = []

    @property
    def label(self) -> str:
        return LABELS[self.backend]

    def fresh(self, sqlite_file: Path, tag: str) -> str:
        """The URL of an empty database: `sqlite_file` (deleted first, with its WAL
        files), or a new PostgreSQL database named after `tag`."""
        if self.server_url is None:
            for suffix in ("", "-wal", "-shm"):
                sqlite_file.with_name(sqlite_file.name + suffix).unlink(missing_ok=True)
            return f"sqlite:///{sqlite_file}"
        name = f"bench_{os.getpid()}_{len(self._created) + 1}_{tag}"
        url = create_database(self.server_url, name)
        self._created.append(name)
        return url

    def drop(self, url: str) -> None:
        """Drop a database made by `fresh` once its round is measured (SQLite: nothing)."""
        if self.server_url is None:
            return
        name = make_url(url).database
        if name in self._created:
            drop_database(self.server_url, name)
            self._created.remove(name)

    def close(self) -> None:
        """Drop every database still left."""
        if self.server_url is not None:
            for name in list(self._created):
                drop_database(self.server_url, name)
            self._created.clear()
