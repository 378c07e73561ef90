"""The usage records' time: UTC, to the millisecond (truncated), ending in ``Z``."""

from __future__ import annotations

import pytest

from llmops_gateway.usage_records import timestamp


@pytest.mark.parametrize(
    ("epoch_s", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (951782400.0005, "2000-02-29T00:00:00.000Z"),
        (1796481746.9876, "2026-12-05T14:42:26.987Z"),
        (1796481746.1, "2026-12-05T14:42:26.100Z"),
    ],
)
def test_record_times_are_utc_milliseconds_with_z(epoch_s: float, text: str) -> None:
    assert timestamp(epoch_s) == text
