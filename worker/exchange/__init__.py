"""Binance REST: the client, the shared weight budget, history paging, gaps and backfill."""
