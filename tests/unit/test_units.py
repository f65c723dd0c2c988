import pytest

from ferry.domain.errors import InvalidInput
from ferry.domain.units import parse_duration_ms, parse_rate, parse_size


def test_sizes() -> None:
    assert parse_size("256", "mib") == 256 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("512M") == 512 << 20


def test_rates() -> None:
    assert parse_rate("200MiB") == 200 << 20
    assert parse_rate("100mbit") == 12_500_000
    assert parse_rate("1gbit") == 125_000_000


def test_durations() -> None:
    assert parse_duration_ms("300ms") == 300
    assert parse_duration_ms("2s") == 2000
    assert parse_duration_ms("1h") == 3_600_000 and parse_duration_ms("5min") == 300_000


@pytest.mark.parametrize("fn,text", [(parse_size, "lots"), (parse_size, "5 parsecs"),
                                     (parse_rate, "fast"), (parse_duration_ms, "3d")])
def test_bad_values_name_the_problem(fn, text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as err:
        fn(text)
    assert text.split()[-1] in err.value.problem
