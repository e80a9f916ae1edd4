"""Recorded rows -> Binance's frames again.

`frames` rebuilds a row's payload and stream name.
"""
