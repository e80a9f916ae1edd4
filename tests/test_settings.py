"""Settings: typed and defaulted (tests/test_docs.py checks they are documented)."""

from __future__ import annotations

import pytest

from worker.settings import Settings


def test_defaults_work_without_any_environment() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.database_url == "sqlite:///data/binance.db"
    assert settings.default_stream_kinds == ["trade", "ticker"]


def test_values_are_converted_to_the_field_types() -> None:
    settings = Settings.from_env(
        {"DRAIN_BATCH_SIZE": " 250 ", "DRAIN_INTERVAL_SECONDS": "0.5", "DEFAULT_STREAMS": "trade, kline_1m,"}
    )
    assert settings.drain_batch_size == 250
    assert settings.drain_interval_seconds == 0.5
    assert settings.default_stream_kinds == ["trade", "kline_1m"]


def test_a_bad_value_names_the_variable_and_the_default() -> None:
    with pytest.raises(
        ValueError, match=r"DRAIN_BATCH_SIZE='lots' is not a valid int; unset it to use the default 5000"
    ):
        Settings.from_env({"DRAIN_BATCH_SIZE": "lots"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DRAIN_BATCH_SIZE": "0"}, r"DRAIN_BATCH_SIZE=0 is out of range: it must be at least 1; unset it"),
        ({"FLUSH_INTERVAL_MS": "-5"}, r"FLUSH_INTERVAL_MS=-5 is out of range"),
        ({"DRAIN_INTERVAL_SECONDS": "0"}, r"DRAIN_INTERVAL_SECONDS=0.0 is out of range"),
        ({"MAX_STREAMS_PER_CONNECTION": "2000"}, r"must be between 1 and 1024"),
        ({"DATABASE_URL": "mysql://x"}, r"DATABASE_URL='mysql://x' is not supported: use sqlite:///"),
    ],
)
def test_values_out_of_range_and_unsupported_databases_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_the_edges_of_the_ranges_are_accepted() -> None:
    settings = Settings.from_env({"RETENTION_DAYS": "0", "MAX_STREAMS_PER_CONNECTION": "1024"})
    assert (settings.retention_days, settings.max_streams_per_connection) == (0, 1024)
    assert Settings.from_env({"DATABASE_URL": "postgresql+psycopg://u:p@h/d"}).database_url.startswith("postgresql")


def test_a_renamed_setting_is_still_read_until_its_new_name_is_set() -> None:
    assert Settings.from_env({}).listing_refresh_seconds == 600.0
    assert Settings.from_env({"LISTING_CHECK_INTERVAL_SECONDS": "60"}).listing_refresh_seconds == 60.0
    both = {"LISTING_CHECK_INTERVAL_SECONDS": "60", "LISTING_REFRESH_SECONDS": "900"}
    assert Settings.from_env(both).listing_refresh_seconds == 900.0
