"""The DAPO policy loss: hand-derived branches, aggregation modes, exact accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo.algorithm.loss import (
    SHARE_METRICS,
    agg_loss,
    apply_overlong_filter,
    clipped_surrogate,
    entropy_from_logits,
    kl_penalty,
    loss_normalizer,
    masked_mean,
    policy_loss,
    token_log_probs,
)
from proto.runspec import ActorConfig
from proto.vocab import LOSS_AGG_MODES

torch.set_num_threads(1)
F64 = torch.float64


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---- per-token surrogate: each branch by hand -------------------------------------------
# eps_low 0.2, eps_high 0.28, c 10. Columns: (A, r, expected loss, expected d loss / d log r)
BRANCHES = [
    (2.0, 1.1, -2.2, -2.2),  # A > 0 unclipped: -A r, gradient -A r
    (1.0, 1.5, -1.28, 0.0),  # A > 0, r > 1.28: clipped high, constant -A (1 + eps_high)
    (1.0, 0.5, -0.5, -0.5),  # A > 0, r < 0.8: no lower clip for positive advantages
    (-1.0, 0.5, 0.8, 0.0),  # A < 0, r < 0.8: clipped low, constant -A (1 - eps_low)
    (-1.0, 2.0, 2.0, 2.0),  # A < 0, r > 1.28: unclipped, below the dual bound 10
    (-1.0, 20.0, 10.0, 0.0),  # A < 0, -A r = 20 > -A c = 10: dual clip
    (0.0, 3.0, 0.0, 0.0),  # A == 0: no signal
]


@pytest.mark.parametrize(("adv", "r", "want", "want_grad"), BRANCHES)
def test_clipped_surrogate_branches(adv: float, r: float, want: float, want_grad: float) -> None:
    log_r = torch.tensor([[math.log(r)]], dtype=F64, requires_grad=True)
    loss, dual = clipped_surrogate(log_r.exp(), _t([[adv]]), 0.2, 0.28, 10.0)
    loss.sum().backward()
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert log_r.grad.item() == pytest.approx(want_grad, abs=1e-12)
    assert bool(dual.item()) == (adv < 0 and r == 20.0)


def test_dual_clip_off_keeps_large_negative_loss() -> None:
    loss, dual = clipped_surrogate(_t([[20.0]]), _t([[-1.0]]), 0.2, 0.28, None)
    assert loss.item() == pytest.approx(20.0)
    assert not dual.any()


def test_symmetric_clip_differs_from_clip_higher() -> None:
    # r = 1.25 with A > 0: clipped at 1.2 by GRPO's symmetric clip, free under Clip-Higher
    sym, _ = clipped_surrogate(_t([[1.25]]), _t([[1.0]]), 0.2, 0.2, None)
    high, _ = clipped_surrogate(_t([[1.25]]), _t([[1.0]]), 0.2, 0.28, None)
    assert sym.item() == pytest.approx(-1.2)
    assert high.item() == pytest.approx(-1.25)


def test_policy_loss_token_mean_and_metrics_by_hand() -> None:
    # one row per branch of BRANCHES (one token each) plus a padding column
    adv = _t([[a, 0.0] for a, *_ in BRANCHES])
    logp_old = torch.zeros_like(adv)
    logp_new = _t([[math.log(r), 0.0] for _, r, *_ in BRANCHES]).requires_grad_()
    mask = torch.tensor([[1, 0]] * len(BRANCHES))
    cfg = ActorConfig()  # token-mean, 0.2 / 0.28, c = 10
    loss, m = policy_loss(
        logp_new, logp_old, adv, mask, cfg, normalizer=loss_normalizer(mask, "token-mean")
    )
    n = len(BRANCHES)
    assert loss.item() == pytest.approx(sum(b[2] for b in BRANCHES) / n)
    loss.backward()
    assert logp_new.grad[:, 0].tolist() == pytest.approx([b[3] / n for b in BRANCHES])
    assert logp_new.grad[:, 1].abs().sum().item() == 0.0
    assert m["pg_clipfrac_high"].item() == pytest.approx(1 / n)
    assert m["pg_clipfrac_low"].item() == pytest.approx(1 / n)
    assert m["pg_clipfrac_dual"].item() == pytest.approx(1 / n)
    want_kl = -sum(math.log(b[1]) for b in BRANCHES) / n
    assert m["ppo_kl"].item() == pytest.approx(want_kl)
    assert m["pg_loss"].item() == pytest.approx(loss.item())
    assert "entropy" not in m and "kl_ref" not in m


def test_advantage_per_sample_broadcasts() -> None:
    logp_new = _t([[0.1, -0.2], [0.3, 0.0]])
    mask = torch.ones(2, 2)
    cfg = ActorConfig()
    a, _ = policy_loss(
        logp_new,
        torch.zeros(2, 2, dtype=F64),
        _t([[1.0, 1.0], [-1.0, -1.0]]),
        mask,
        cfg,
        normalizer=4.0,
    )
    b, _ = policy_loss(
        logp_new,
        torch.zeros(2, 2, dtype=F64),
        torch.tensor([1.0, -1.0], dtype=F64),
        mask,
        cfg,
        normalizer=4.0,
    )
    assert a.item() == b.item()


# ---- aggregation modes by hand ------------------------------------------------------------
VALUES = _t([[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0], [9, 9, 9, 9]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
AGG_BY_HAND = {
    "token-mean": (6.0, 21 / 6),  # 21 over 6 tokens
    "seq-mean-token-mean": (3.0, (2 + 4 + 5.5) / 3),  # empty row not counted
    "seq-mean-token-sum": (3.0, (6 + 4 + 11) / 3),
    "seq-mean-token-sum-norm": (4.0, 21 / 4),  # verl: sum of the rows' token sums / horizon
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_modes_by_hand(mode: str) -> None:
    want_norm, want = AGG_BY_HAND[mode]
    norm = loss_normalizer(MASK, mode, horizon=4)
    assert norm == want_norm
    assert agg_loss(VALUES, MASK, mode, norm).item() == pytest.approx(want)


def test_seq_mean_token_sum_norm_is_verls_agg_loss() -> None:
    # verl's core_algos.agg_loss, "seq-mean-token-sum-norm" with loss_scale_factor H:
    #   seq_losses = sum(loss_mat * loss_mask, -1); loss = sum(seq_losses) / H
    # 4 samples, H = 5 (data.max_response_length); row 3 is empty (overlong-filtered).
    #   row sums: 0.5 + 1.5 = 2.0;  -1.0 + 2.0 + 3.0 = 4.0;  4.0;  0  ->  10.0 / 5 = 2.0
    # (a mean over the 3 non-empty rows would give 2 / 3, over all 4 rows 1 / 2)
    values = _t([[0.5, 1.5, 7.0], [-1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [8.0, 8.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
    norm = loss_normalizer(mask, "seq-mean-token-sum-norm", horizon=5)
    assert norm == 5.0
    assert agg_loss(values, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(2.0)
    # exact accumulation: micro-batches of 1 and 3 rows with the mini-batch normalizer
    parts = [agg_loss(values[s], mask[s], "seq-mean-token-sum-norm", norm) for s in
             (slice(0, 1), slice(1, 4))]  # fmt: skip
    assert sum(p.item() for p in parts) == pytest.approx(2.0)


def test_norm_mode_needs_horizon_and_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="horizon"):
        loss_normalizer(MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        loss_normalizer(MASK, "sum")
    with pytest.raises(ValueError, match="normalizer"):
        agg_loss(VALUES, MASK, "token-mean", 0.0)


def test_all_masked_batch_is_zero_not_nan() -> None:
    mask = torch.zeros(3, 5)
    for mode in LOSS_AGG_MODES:
        norm = loss_normalizer(mask, mode, horizon=5)
        assert agg_loss(VALUES[:3, :4].repeat(1, 2)[:, :5], mask, mode, norm).item() == 0.0
    assert masked_mean(torch.ones(3, 5), mask).item() == 0.0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_garbage_in_masked_positions_never_leaks(mode: str) -> None:
    logp_new = _t([[-0.5, float("nan"), float("-inf")], [float("inf"), float("nan"), 0.0]])
    logp_new.requires_grad_()
    logp_old = _t([[-0.4, float("-inf"), float("nan")], [0.0, 1.0, float("nan")]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])  # second row fully masked
    cfg = ActorConfig(loss_agg_mode=mode, use_kl_loss=True, kl_loss_coef=0.1, entropy_coeff=0.01)
    ent = _t([[1.0, float("nan"), 2.0], [float("inf"), 0.0, 0.0]])
    loss, metrics = policy_loss(
        logp_new,
        logp_old,
        _t([[1.0, float("nan"), 1.0], [2.0, 2.0, 2.0]]),
        mask,
        cfg,
        normalizer=loss_normalizer(mask, mode, horizon=3),
        is_weights=_t([[0.5, float("nan"), float("inf")], [float("nan"), 1.0, 1.0]]),
        logp_ref=logp_old,
        entropy=ent,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(logp_new.grad).all()
    assert logp_new.grad[mask == 0].abs().sum() == 0


# ---- exact accumulation over micro-batches ------------------------------------------------
def _random_batch(seed: int, b: int, t: int, empty_rows: list[bool]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[torch.tensor(empty_rows, dtype=torch.bool)] = 0
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(F64)  # right padding
    logp_old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    return {
        "logp_new": logp_old + torch.randn(b, t, generator=g, dtype=F64) * 0.5,
        "logp_old": logp_old,
        "is_weights": torch.rand(b, t, generator=g, dtype=F64) * 2,
        "logp_ref": logp_old + torch.randn(b, t, generator=g, dtype=F64) * 0.3,
        "entropy": torch.rand(b, t, generator=g, dtype=F64) * 2,
        "adv": torch.randn(b, generator=g, dtype=F64) * 2,
        "mask": mask,
    }


def _loss_and_grads(batch: dict, rows: slice, cfg: ActorConfig, norm: float, weights: bool):
    new = batch["logp_new"][rows].clone().requires_grad_()
    ent = batch["entropy"][rows].clone().requires_grad_()
    loss, m = policy_loss(
        new,
        batch["logp_old"][rows],
        batch["adv"][rows],
        batch["mask"][rows],
        cfg,
        normalizer=norm,
        is_weights=batch["is_weights"][rows] if weights else None,
        logp_ref=batch["logp_ref"][rows],
        entropy=ent,
    )
    loss.backward()
    # no entropy bonus: the entropy gets no gradient at all
    ent_grad = torch.zeros_like(ent) if ent.grad is None else ent.grad
    return loss.detach(), new.grad, ent_grad, {k: m[k] for k in SHARE_METRICS}


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    b=st.integers(1, 7),
    t=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(LOSS_AGG_MODES),
    extras=st.booleans(),
)
def test_micro_batches_sum_to_full_batch(data, b, t, seed, mode, extras) -> None:
    empty = data.draw(st.lists(st.booleans(), min_size=b, max_size=b))
    cuts = sorted(data.draw(st.lists(st.integers(0, b), max_size=3)))
    batch = _random_batch(seed, b, t, empty)
    cfg = ActorConfig(
        loss_agg_mode=mode,
        clip_ratio_c=3.0 if extras else None,
        use_kl_loss=extras,
        kl_loss_coef=0.05,
        entropy_coeff=0.01 if extras else 0.0,
    )
    norm = loss_normalizer(batch["mask"], mode, horizon=t)
    full_loss, full_g, full_ge, full_share = _loss_and_grads(batch, slice(0, b), cfg, norm, extras)
    bounds = [0, *cuts, b]
    spans = zip(bounds[:-1], bounds[1:], strict=True)
    parts = [_loss_and_grads(batch, slice(lo, hi), cfg, norm, extras) for lo, hi in spans]
    summed = sum(p[0] for p in parts)
    assert torch.allclose(summed, full_loss, rtol=1e-12, atol=1e-14)
    assert torch.allclose(torch.cat([p[1] for p in parts]), full_g, rtol=1e-12, atol=1e-14)
    assert torch.allclose(torch.cat([p[2] for p in parts]), full_ge, rtol=1e-12, atol=1e-14)
    for k in SHARE_METRICS:  # a share metric sums over micro-batches to the mini-batch value
        share = sum(p[3][k] for p in parts)
        assert torch.allclose(share, full_share[k], rtol=1e-12, atol=1e-14), k


def test_token_mean_weights_tokens_not_samples() -> None:
    # a long and a short sample, same per-token loss: token-mean gives each token the
    # same weight; seq-mean-token-mean gives the short sample's tokens more
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    logp = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0], dtype=F64)
    grads = {}
    for mode in ("token-mean", "seq-mean-token-mean"):
        cfg = ActorConfig(loss_agg_mode=mode)
        loss, _ = policy_loss(
            logp, logp.detach(), adv, mask, cfg, normalizer=loss_normalizer(mask, mode)
        )
        (g,) = torch.autograd.grad(loss, logp)
        grads[mode] = g
    assert grads["token-mean"][0, 0] == grads["token-mean"][1, 0] == pytest.approx(-1 / 5)
    assert grads["seq-mean-token-mean"][0, 0].item() == pytest.approx(-1 / 8)
    assert grads["seq-mean-token-mean"][1, 0].item() == pytest.approx(-1 / 2)


# ---- entropy, KL, importance weights, overlong filter ----------------------------------------------------
def test_entropy_from_logits_matches_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=F64) * 4
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    direct = -(p * torch.log(p)).sum(-1)
    assert torch.allclose(entropy_from_logits(logits), direct, rtol=1e-12)
    uniform = torch.zeros(1, 1, 8, dtype=F64)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))


def test_entropy_large_and_infinite_logits_stay_finite() -> None:
    logits = torch.tensor([[[1e4, 1e4, float("-inf"), 0.0]]], dtype=torch.float32)
    logits.requires_grad_()
    h = entropy_from_logits(logits)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_entropy_metric_and_bonus() -> None:
    logits = torch.zeros(1, 2, 4, dtype=F64, requires_grad=True)
    logp = torch.zeros(1, 2, dtype=F64)
    mask = torch.ones(1, 2)
    cfg = ActorConfig(entropy_coeff=0.5)
    loss, m = policy_loss(
        logp, logp, torch.zeros(1, dtype=F64), mask, cfg, normalizer=2.0, logits=logits
    )
    assert m["entropy"].item() == pytest.approx(math.log(4))
    assert loss.item() == pytest.approx(-0.5 * math.log(4))  # A = 0: only the bonus
    assert loss.requires_grad
    with pytest.raises(ValueError, match="entropy_coeff"):
        policy_loss(logp, logp, torch.zeros(1, dtype=F64), mask, cfg, normalizer=2.0)


def test_kl_estimators_by_hand() -> None:
    new, ref = _t([[math.log(0.5)]]), _t([[math.log(0.25)]])
    assert kl_penalty(new, ref, "k1").item() == pytest.approx(math.log(2))
    # d = log(0.25 / 0.5) = -log 2: k3 = 0.5 + log 2 - 1
    assert kl_penalty(new, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(new, new, "k3").item() == 0.0


def test_kl_loss_added_with_coefficient() -> None:
    new, ref = _t([[math.log(0.5), 0.0]]), _t([[math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 0]])
    cfg = ActorConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k1")
    loss, m = policy_loss(
        new, new, torch.zeros(1, dtype=F64), mask, cfg, normalizer=1.0, logp_ref=ref
    )
    assert loss.item() == pytest.approx(0.1 * math.log(2))
    assert m["kl_ref"].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="use_kl_loss"):
        policy_loss(new, new, torch.zeros(1, dtype=F64), mask, cfg, normalizer=1.0)


def test_importance_weights_multiply_each_tokens_surrogate() -> None:
    # decoupled PPO: l_t = w_t * max(-A r_t, -A clip(r_t)), w detached
    new = _t([[math.log(1.1), math.log(1.5), 0.0]]).requires_grad_()
    old = torch.zeros(1, 3, dtype=F64)
    w = _t([[0.5, 2.0, 1.0]])
    loss, m = policy_loss(
        new, old, torch.ones(1, dtype=F64), torch.ones(1, 3), ActorConfig(), normalizer=3.0,
        is_weights=w,
    )  # fmt: skip
    # per token: -1.1 * 0.5, -1.28 (clipped) * 2, -1 * 1
    assert loss.item() == pytest.approx((-0.55 - 2.56 - 1.0) / 3)
    assert m["pg_loss"].item() == pytest.approx(loss.item())
    loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([-1.1 * 0.5 / 3, 0.0, -1.0 / 3])
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(new, old, torch.ones(1), torch.ones(1, 3), ActorConfig(), normalizer=3.0,
                    is_weights=torch.ones(1, 2))  # fmt: skip


def test_apply_overlong_filter() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = apply_overlong_filter(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert out.dtype == mask.dtype
    assert (
        apply_overlong_filter(mask.bool(), torch.tensor([True, False, False])).dtype == torch.bool
    )
    with pytest.raises(ValueError, match="truncated"):
        apply_overlong_filter(mask, torch.tensor([True]))


def test_token_log_probs_matches_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g, dtype=F64)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_log_probs(logits, tokens), want, rtol=1e-12)
