"""The billing routes' own parameters: a bad value is a clear InvalidInput naming it."""

from __future__ import annotations

import pytest

from unkey_deploy.billing.http import parse_since
from unkey_deploy.core.errors import InvalidInput


def test_since_accepts_durations_up_to_31_days() -> None:
    assert parse_since("90s") == 90.0
    assert parse_since("31d") == 31 * 86400.0


@pytest.mark.parametrize("value", ["0s", "32d", "5w", "-1h", "1.5h", "", "9" * 5000 + "s"])
def test_since_out_of_range_or_malformed_is_invalid_input(value: str) -> None:
    # 5000 digits used to raise Python's ValueError (int() refuses over 4300 digits): a 500
    with pytest.raises(InvalidInput, match="since"):
        parse_since(value)
