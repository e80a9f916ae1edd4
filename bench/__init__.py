"""The recorder's benchmark: `python -m bench` (see docs/performance.md).

Ingest, drain, end-to-end latency, memory, scale, and the design this project
replaces, all against fake exchanges on 127.0.0.1 (nothing contacts Binance).
"""
