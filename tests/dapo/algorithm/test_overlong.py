"""Soft overlong punishment: hand-derived values at every branch boundary, properties, validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dapo.algorithm.overlong import overlong_penalty


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        # Lmax = 10, Lcache = 4, factor = 2: the ramp starts after 6 tokens.
        (0, 0.0),
        (6, 0.0),  # L = Lmax - Lcache: last length without penalty
        (7, -0.5),  # (6 - 7) / 4 * 2
        (8, -1.0),
        (9, -1.5),
        (10, -2.0),  # L = Lmax: the full factor
        (11, -2.0),  # beyond Lmax: constant
        (1000, -2.0),
    ],
)
def test_small_budget_each_branch(length: int, expected: float) -> None:
    assert overlong_penalty(length, 10, 4, 2.0) == expected


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        # The DAPO reference run: Lmax = 20480, Lcache = 4096, factor = 1.
        (16384, 0.0),
        (16385, -1 / 4096),
        (18432, -0.5),
        (20479, -4095 / 4096),
        (20480, -1.0),
        (20481, -1.0),
    ],
)
def test_reference_run_values(length: int, expected: float) -> None:
    assert overlong_penalty(length, 20480, 4096, 1.0) == pytest.approx(expected, abs=1e-15)


def test_buffer_as_long_as_budget() -> None:
    assert overlong_penalty(0, 4, 4, 1.0) == 0.0
    assert overlong_penalty(1, 4, 4, 1.0) == -0.25
    assert overlong_penalty(4, 4, 4, 1.0) == -1.0


def test_zero_factor_gives_plain_zero() -> None:
    for length in (0, 9, 10, 11):
        value = overlong_penalty(length, 10, 4, 0.0)
        assert value == 0.0 and math.copysign(1.0, value) == 1.0


@given(
    lmax=st.integers(1, 50_000),
    frac=st.floats(0.0, 1.0),
    factor=st.floats(0.0, 10.0),
    a=st.integers(0, 60_000),
    b=st.integers(0, 60_000),
)
def test_bounded_monotone_and_continuous(
    lmax: int, frac: float, factor: float, a: int, b: int
) -> None:
    cache = max(1, min(lmax, round(frac * lmax)))
    lo, hi = sorted((a, b))
    p_lo = overlong_penalty(lo, lmax, cache, factor)
    p_hi = overlong_penalty(hi, lmax, cache, factor)
    assert -factor <= p_hi <= p_lo <= 0.0
    assert overlong_penalty(lmax - cache, lmax, cache, factor) == 0.0
    assert overlong_penalty(lmax, lmax, cache, factor) == pytest.approx(-factor)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((5, 10, 0, 1.0), ValueError, "buffer_len"),
        ((5, 10, 11, 1.0), ValueError, "buffer_len .11. must not exceed max_response_length .10."),
        ((-1, 10, 4, 1.0), ValueError, "length"),
        ((5, 0, 1, 1.0), ValueError, "max_response_length"),
        ((5, 10, 4, -0.5), ValueError, "penalty_factor"),
        ((5, 10, 4, float("nan")), ValueError, "penalty_factor"),
        ((5.0, 10, 4, 1.0), TypeError, "length"),
        ((5, 10, True, 1.0), TypeError, "buffer_len"),
    ],
)
def test_invalid_arguments(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        overlong_penalty(*args)
