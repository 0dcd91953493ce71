"""Group-relative advantages: properties, hand values, singleton and constant groups."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo.algorithm.advantages import group_advantages

torch.set_num_threads(1)
F64 = torch.float64

rewards_2d = st.integers(1, 5).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda g: st.lists(
            st.lists(st.floats(-5, 5, allow_nan=False), min_size=g, max_size=g),
            min_size=n,
            max_size=n,
        )
    )
)


@settings(max_examples=80, deadline=None)
@given(rows=rewards_2d, norm=st.booleans())
def test_zero_mean_per_group(rows: list[list[float]], norm: bool) -> None:
    adv = group_advantages(torch.tensor(rows, dtype=F64), norm_by_std=norm)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(len(rows), dtype=F64), atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(rows=rewards_2d)
def test_unit_unbiased_std_when_not_constant(rows: list[list[float]]) -> None:
    r = torch.tensor(rows, dtype=F64)
    adv = group_advantages(r, eps=0.0)
    for i in range(r.shape[0]):
        if r[i].max() - r[i].min() > 1e-3:
            assert adv[i].std(unbiased=True).item() == pytest.approx(1.0, rel=1e-9)
        elif r[i].max() == r[i].min():
            assert adv[i].abs().sum().item() == 0.0


def test_binary_rewards_by_hand() -> None:
    # 1 correct of 4 (+1 / -1): mean -0.5, unbiased std = sqrt(3 / 3) = 1
    adv = group_advantages(torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=F64))
    want = [1.5 / (1 + 1e-6), -0.5 / (1 + 1e-6), -0.5 / (1 + 1e-6), -0.5 / (1 + 1e-6)]
    assert adv[0].tolist() == pytest.approx(want, rel=1e-12)


def test_without_std_division_is_centred_rewards() -> None:
    adv = group_advantages(torch.tensor([[1.0, 2.0, 6.0]]), norm_by_std=False)
    assert adv[0].tolist() == pytest.approx([-2.0, -1.0, 3.0])


def test_constant_group_gives_exact_zeros() -> None:
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point: zeros must still be exact
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    for norm in (True, False):
        adv = group_advantages(r, norm_by_std=norm)
        assert adv[:2].abs().sum().item() == 0.0
        assert adv[2].abs().sum().item() > 0


def test_singleton_group_is_zero() -> None:
    adv = group_advantages(torch.tensor([[3.0], [-1.0]]))
    assert adv.tolist() == [[0.0], [0.0]]
    assert not torch.isnan(adv).any()


def test_integer_rewards_and_shape_errors() -> None:
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.get_default_dtype()
    assert adv[0].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-5)
    with pytest.raises(ValueError, match="num_groups, G"):
        group_advantages(torch.ones(4))
