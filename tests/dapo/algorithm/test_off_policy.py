"""Off-policy correction by hand: importance weights, rejection masks, veto, mismatch and lag
metrics, and the staleness mask."""

from __future__ import annotations

import math

import pytest
import torch

from dapo.algorithm.off_policy import (
    SAFETY_BOUND,
    importance_weights,
    lag_metrics,
    mask_rows,
    mismatch_metrics,
    rejection_mask,
    rollout_correction,
    stale_rows,
    veto_mask,
)
from proto.runspec import RolloutCorrectionConfig

F64 = torch.float64


def _close(got: torch.Tensor, want: list) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-12, atol=1e-12)


def _log(rows: list[list[float]]) -> torch.Tensor:
    """log of a table of ratios (0 stands for a padding position)."""
    return torch.tensor([[math.log(r) if r > 0 else 0.0 for r in row] for row in rows], dtype=F64)


# ratios proximal / behaviour; the last column of row 0 and row 1's tail are padding
RATIOS = [[0.4, 3.0, 1.0, 0.0], [1.5, 1.2, 0.0, 0.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_token_weights_are_truncated_and_metrics_use_the_raw_ratio() -> None:
    w, m = importance_weights(_log(RATIOS), MASK, "token", threshold=2.0)
    _close(w, [[0.4, 2.0, 1.0, 0.0], [1.5, 1.2, 0.0, 0.0]])
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx((0.4 + 3 + 1 + 1.5 + 1.2) / 5)
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(3.0)
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 5)  # truncated
    assert m["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(1 / 5)  # < 1 / 2


def test_sequence_weight_is_the_product_broadcast_over_the_row() -> None:
    w, m = importance_weights(_log(RATIOS), MASK, "sequence", threshold=2.0)
    # row 0: 0.4 * 3 * 1 = 1.2; row 1: 1.5 * 1.2 = 1.8
    _close(w, [[1.2, 1.2, 1.2, 0.0], [1.8, 1.8, 0.0, 0.0]])
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(1.8)
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == 0.0  # per sequence
    w, m = importance_weights(_log(RATIOS), MASK, "sequence", threshold=1.5)
    assert w[1].tolist() == pytest.approx([1.5, 1.5, 0.0, 0.0])
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 2)


def test_weights_are_safety_bounded_and_detached() -> None:
    log_ratio = torch.tensor([[30.0, -30.0], [15.0, 15.0]], dtype=F64, requires_grad=True)
    mask = torch.ones(2, 2)
    w, m = importance_weights(log_ratio, mask, "token", threshold=1e6)
    assert not w.requires_grad
    assert w[0, 1].item() == pytest.approx(math.exp(-SAFETY_BOUND))
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(SAFETY_BOUND))
    w, _ = importance_weights(log_ratio, mask, "sequence", threshold=1e12)
    assert w[1].tolist() == pytest.approx([math.exp(SAFETY_BOUND)] * 2)  # exp(30) bounded


def test_batch_normalize_token_and_sequence() -> None:
    w, m = importance_weights(_log(RATIOS), MASK, "token", threshold=2.0, batch_normalize=True)
    assert (w * MASK).sum().item() / 5 == pytest.approx(1.0)
    assert m["rollout_corr/rollout_is_batch_norm_factor"] == pytest.approx(6.1 / 5)
    w, _ = importance_weights(_log(RATIOS), MASK, "sequence", threshold=2.0, batch_normalize=True)
    assert (w[0, 0] + w[1, 0]).item() / 2 == pytest.approx(1.0)  # mean over sequences


@pytest.mark.parametrize(
    ("level", "keep"),
    [
        ("token", [[False, False, True, False], [True, True, False, False]]),
        # products 1.2 and 1.8: both inside [0.5, 2]
        ("sequence", [[True, True, True, False], [True, True, False, False]]),
    ],
)
def test_rejection_levels(level: str, keep: list[list[bool]]) -> None:
    got, m = rejection_mask(_log(RATIOS), MASK, level, lower=0.5, upper=2.0)
    assert got.tolist() == keep
    rejected = sum(k is False and bool(x) for rk, rx in zip(keep, MASK.tolist(), strict=True)
                   for k, x in zip(rk, rx, strict=True))  # fmt: skip
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(rejected / 5)


def test_geometric_rejection_uses_the_mean_log_ratio() -> None:
    # row 0: geometric mean (0.4 * 3 * 1) ** (1/3) = 1.063; row 1: (1.8) ** 0.5 = 1.342
    got, m = rejection_mask(_log(RATIOS), MASK, "geometric", lower=0.9, upper=1.2)
    assert got.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert m["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 2)
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(2 / 5)


def test_veto_masks_the_whole_sequence() -> None:
    ratios = [[1.0, 1e-5, 1.0], [1.0, 0.5, 1.0]]
    got, m = veto_mask(_log(ratios), torch.ones(2, 3), threshold=1e-4)
    assert got.tolist() == [[False] * 3, [True] * 3]
    assert m["rollout_corr/rollout_is_veto_fraction"] == pytest.approx(1 / 2)
    assert m["rollout_corr/rollout_is_catastrophic_token_fraction"] == pytest.approx(1 / 6)


def test_mismatch_metrics_by_hand() -> None:
    proximal = torch.tensor([[-1.0, -2.0, 99.0]], dtype=F64)
    behaviour = torch.tensor([[-1.5, -1.0, -99.0]], dtype=F64)
    m = mismatch_metrics(proximal, behaviour, torch.tensor([[1, 1, 0]]))
    d = [0.5, -1.0]  # proximal - behaviour on the counted tokens
    assert m["rollout_corr/kl"] == pytest.approx(-sum(d) / 2)  # mean(behaviour - proximal)
    assert m["rollout_corr/k3_kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 2)
    assert m["rollout_corr/log_prob_abs_diff_max"] == pytest.approx(1.0)  # padding ignored
    assert m["rollout_corr/log_prob_abs_diff_mean"] == pytest.approx(0.75)


def _cfg(**kw) -> RolloutCorrectionConfig:
    return RolloutCorrectionConfig(**kw)


def test_correction_combines_weights_rejection_and_veto() -> None:
    behaviour = torch.zeros(2, 4, dtype=F64)
    proximal = _log(RATIOS)
    cfg = _cfg(rollout_is="token", rollout_rs="token", rollout_token_veto_threshold=0.45)
    c = rollout_correction(proximal, behaviour, MASK, cfg)
    # 0.4 vetoes row 0; 3.0 is outside [0.5, 2]; row 1 is kept whole
    assert c.mask.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    assert c.mask.dtype == MASK.dtype
    _close(c.weights, [[0.4, 2.0, 1.0, 0.0], [1.5, 1.2, 0.0, 0.0]])
    assert c.metrics["rollout_corr/rollout_is_veto_fraction"] == pytest.approx(1 / 2)
    assert {"rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/rollout_is_mean"} <= set(
        c.metrics
    )


def test_correction_without_weight_or_rejection_only_measures() -> None:
    c = rollout_correction(_log(RATIOS), torch.zeros(2, 4, dtype=F64), MASK, _cfg(rollout_is=None))
    assert c.weights is None
    assert torch.equal(c.mask, MASK)
    assert "rollout_corr/rollout_is_mean" not in c.metrics and "rollout_corr/kl" in c.metrics


def test_correction_rs_bounds_default_to_the_is_threshold() -> None:
    cfg = _cfg(rollout_is=None, rollout_rs="token", rollout_is_threshold=4.0)
    c = rollout_correction(_log(RATIOS), torch.zeros(2, 4, dtype=F64), MASK, cfg)
    assert c.mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]  # band [0.25, 4]: 0.4 in, 3 in
    cfg = _cfg(rollout_is=None, rollout_rs="token", rollout_rs_threshold=1.3)
    c = rollout_correction(_log(RATIOS), torch.zeros(2, 4, dtype=F64), MASK, cfg)
    assert c.mask.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]  # band [1 / 1.3, 1.3]


def test_empty_mask_gives_zeros_not_nan() -> None:
    mask = torch.zeros(2, 3)
    cfg = _cfg(rollout_is="sequence", rollout_rs="geometric", rollout_token_veto_threshold=1e-3)
    c = rollout_correction(torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64), mask, cfg)
    assert all(math.isfinite(v) for v in c.metrics.values())
    assert not c.mask.any()
    assert lag_metrics(torch.ones(2, 3, dtype=torch.long), mask)["staleness/lag_max"] == 0.0


def test_stale_rows_and_lag_histogram() -> None:
    lag = torch.tensor([[0, 0, 5], [1, 2, 2], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])  # row 0's lag 5 is padding
    assert stale_rows(lag, mask, max_staleness=1).tolist() == [False, True, True]
    assert stale_rows(lag, mask, max_staleness=4).tolist() == [False, False, False]
    m = lag_metrics(lag, mask)
    assert m["staleness/lag_mean"] == pytest.approx((0 + 0 + 1 + 2 + 2 + 3 + 4) / 7)
    assert m["staleness/lag_max"] == 4.0
    assert [m[f"staleness/tokens_lag_{k}"] for k in ("0", "1", "2", "3plus")] == [2, 1, 2, 2]


def test_mask_rows() -> None:
    mask = torch.ones(3, 2)
    assert mask_rows(mask, torch.tensor([False, True, False])).tolist() == [
        [1, 1],
        [0, 0],
        [1, 1],
    ]
