import pytest
from deepseek_operator.durations import format_timestamp, parse_duration, parse_timestamp


@pytest.mark.parametrize(("text", "seconds"), [
    ("72h", 72 * 3600), ("30s", 30), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25), ("0s", 0), ("90m", 5400),
])
def test_parse_duration_reads_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "72", "3d", "1h 30m", "-5s", "h"])
def test_parse_duration_rejects_other_text_naming_the_value(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_timestamps_round_trip_in_whole_utc_seconds():
    assert format_timestamp(1_800_000_000.9) == "2027-01-15T08:00:00Z"
    assert parse_timestamp("2027-01-15T08:00:00Z") == 1_800_000_000
