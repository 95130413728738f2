"""The morning report (services/ledger/report.py): its pure parts here; the report of a real RL loop's ledger,
opened in Chromium (tests/pages.py), at the end of tests/test_policy_loop.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.ledger.report import parse_since

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_since_takes_a_duration_or_an_iso_time():
    assert parse_since("12h", NOW) == datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
    assert parse_since("90m", NOW) == datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    assert parse_since("2d", NOW) == datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert parse_since("2026-11-23T08:00") == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    assert parse_since("2026-11-23T08:00+01:00").utcoffset().total_seconds() == 3600
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday")
