"""Moved to worker/ops/local_postgres.py (the benchmark starts clusters too); kept so that
tests written before the move still import."""

from worker.ops.local_postgres import INSTALL_HINT, PostgresServer, find_postgres_bin

__all__ = ["INSTALL_HINT", "PostgresServer", "find_postgres_bin"]
