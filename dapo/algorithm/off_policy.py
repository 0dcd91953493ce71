"""Off-policy correction as pure functions of tensors: importance weights, rejection masks,
the veto, mismatch metrics, and the staleness mask.

Three policies meet in a training step: the behaviour policy mu that generated a sample
(the rollout engine: its weights, possibly several versions old, and its numerics; its
per-token log-probs travel with the sample), the proximal policy pi_old (the learner's
weights before the step, log-probs recomputed by the learner), and the policy pi_theta
being trained. With ``algorithm.rollout_correction`` in decoupled mode PPO's clipped
ratio is pi_theta / pi_old, and the per-token ratio rho_t = pi_old / mu (this module's
``log_ratio``) corrects for the gap between sampling and anchor:

- importance weights (``rollout_is``; verl's token_is / seq_is, AReaL's decoupled PPO):
  each token's surrogate is multiplied by w_t = min(rho_t, threshold) (token), or by
  min(prod_t rho_t, threshold) for every token of the sequence (sequence); rho is first
  bounded to [exp(-20), exp(20)] and w is detached;
- rejection (``rollout_rs``; verl's MIS / IcePop-style masks): tokens (token) or whole
  sequences (sequence: prod_t rho_t; geometric: exp(mean_t log rho_t)) whose ratio lies
  outside [lower, upper] are masked out of the loss and of its normaliser;
- the veto (``rollout_token_veto_threshold``): a sequence with any rho_t below it is masked.

Metric names follow verl's ``rollout_corr/`` ones where verl has them; every metric is a
float over the counted tokens (or sequences with at least one counted token), 0 when none
is counted. ``mask`` arguments are (B, T), non-zero where a response token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proto.runspec import RolloutCorrectionConfig

SAFETY_BOUND = 20.0
"""|log ratio| is clamped to this before exp: ratios stay within [exp(-20), exp(20)]."""
CORR = "rollout_corr/"
STALE = "staleness/"
LAG_BUCKETS = ("0", "1", "2", "3plus")
"""Histogram buckets of the token lag: 0, 1, 2 and 3 or more (lag <= 0 counts as 0)."""


def _mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean of ``values`` where ``keep`` (bool, same shape); 0.0 when nothing is kept."""
    count = int(keep.sum())
    return float(torch.where(keep, values, 0.0).sum()) / count if count else 0.0


def _max(values: torch.Tensor, keep: torch.Tensor) -> float:
    return float(values[keep].max()) if bool(keep.any()) else 0.0


def _min(values: torch.Tensor, keep: torch.Tensor) -> float:
    return float(values[keep].min()) if bool(keep.any()) else 0.0


def level_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho at ``level``, broadcast over each row: (B, T) -> (B, T).

    token: log rho_t; sequence: sum over the row's counted tokens (log of the product);
    geometric: their mean. Positions outside ``mask`` never contribute.
    """
    keep = mask.bool()
    lr = torch.where(keep, log_ratio, 0.0)  # (B, T)
    if level == "token":
        return lr
    row = lr.sum(dim=-1, keepdim=True)  # (B, 1)
    if level == "geometric":
        row = row / keep.sum(dim=-1, keepdim=True).clamp(min=1)
    elif level != "sequence":
        raise ValueError(f"level must be token, sequence or geometric, got {level!r}")
    return row.expand_as(lr)


def _units(mask: torch.Tensor, level: str) -> torch.Tensor:
    """Where a level's statistics are read, (B, T) bool: every counted token for token, the
    first column of each row with a counted token for the sequence levels (one unit each)."""
    keep = mask.bool()
    if level == "token":
        return keep
    first = torch.zeros_like(keep)
    first[:, 0] = keep.any(dim=-1)
    return first


def importance_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    threshold: float,
    batch_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights from ``log_ratio`` = log pi_old - log mu, (B, T).

    Returns (w, metrics): w (B, T), detached, min(rho, threshold) at ``level`` ("token" or
    "sequence"), 0 outside ``mask``; with ``batch_normalize`` divided by its mean over the
    batch's units (tokens, or sequences) of ``mask``, taken before any rejection, as verl
    does (the whole batch is on every rank here, so no cross-rank mean is needed). Metrics (verl's): rollout_is_mean / _max of the
    safety-bounded ratio before truncation, rollout_is_ratio_fraction_high (units
    truncated) and _low (units below 1 / threshold), and rollout_is_batch_norm_factor.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout_is must be token or sequence, got {level!r}")
    keep = mask.bool()
    log_rho = level_log_ratio(log_ratio.detach(), mask, level)
    rho = torch.exp(log_rho.clamp(-SAFETY_BOUND, SAFETY_BOUND))  # (B, T), untruncated
    units = _units(mask, level)
    metrics = {
        "rollout_is_mean": _mean(rho, keep),
        "rollout_is_max": _max(rho, keep),
        "rollout_is_ratio_fraction_high": _mean((rho > threshold).to(rho.dtype), units),
        "rollout_is_ratio_fraction_low": _mean((rho < 1.0 / threshold).to(rho.dtype), units),
    }
    w = torch.where(keep, rho.clamp(max=threshold), 0.0)  # (B, T)
    if batch_normalize:
        factor = _mean(w, units)
        if factor > 1e-8:
            w = w / factor
        metrics["rollout_is_batch_norm_factor"] = factor if factor > 1e-8 else 1.0
    return w, {CORR + k: v for k, v in metrics.items()}


def rejection_mask(
    log_ratio: torch.Tensor, mask: torch.Tensor, level: str, lower: float, upper: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Which counted tokens survive rejection: (B, T) bool, False outside ``mask``.

    A token (level token) or every token of a sequence (sequence, geometric) is kept when
    its safety-bounded ratio lies in [lower, upper]. Metrics: rollout_rs_masked_fraction
    (counted tokens rejected), rollout_rs_seq_masked_fraction (sequences with a counted
    token that lost at least one), rollout_rs_mean / _max / _min of the ratio per unit.
    """
    keep = mask.bool()
    rho = torch.exp(level_log_ratio(log_ratio, mask, level).clamp(-SAFETY_BOUND, SAFETY_BOUND))
    kept = keep & (rho >= lower) & (rho <= upper)  # NaN ratios compare False: rejected
    units = _units(mask, level)
    metrics = {
        "rollout_rs_masked_fraction": _mean((~kept).to(rho.dtype), keep),
        "rollout_rs_seq_masked_fraction": _seq_fraction(keep & ~kept, keep),
        "rollout_rs_mean": _mean(rho, units),
        "rollout_rs_max": _max(rho, units),
        "rollout_rs_min": _min(rho, units),
    }
    return kept, {CORR + k: v for k, v in metrics.items()}


def _seq_fraction(hit: torch.Tensor, keep: torch.Tensor) -> float:
    """Fraction of the rows with a counted token that have a ``hit`` token: (B, T) bools."""
    rows = keep.any(dim=-1)  # (B,)
    return _mean(hit.any(dim=-1).to(torch.float64), rows)


def veto_mask(
    log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Counted tokens of the sequences with no token ratio below ``threshold``, (B, T) bool.

    The raw (unbounded) log ratio is compared with log(threshold), as verl's veto does.
    Metrics: rollout_is_veto_fraction (sequences vetoed), and
    rollout_is_catastrophic_token_fraction (counted tokens below the threshold).
    """
    keep = mask.bool()
    bad = keep & (log_ratio < torch.log(torch.tensor(threshold, dtype=torch.float64)).item())
    vetoed = bad.any(dim=-1, keepdim=True)  # (B, 1)
    metrics = {
        "rollout_is_veto_fraction": _seq_fraction(bad, keep),
        "rollout_is_catastrophic_token_fraction": _mean(bad.to(torch.float64), keep),
    }
    return keep & ~vetoed, {CORR + k: v for k, v in metrics.items()}


def mismatch_metrics(
    logp_proximal: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the behaviour log-probs (B, T) are from the recomputed ones (B, T).

    kl: mean of log mu - log pi_old (k1 estimate of KL(mu || pi_old) from mu's samples);
    k3_kl: mean of rho - log rho - 1 with rho = pi_old / mu (non-negative, low variance);
    log_prob_abs_diff_max / _mean: of |log pi_old - log mu|. Over counted tokens only.
    """
    keep = mask.bool()
    d = torch.where(keep, logp_proximal.detach() - logp_behavior.detach(), 0.0)  # (B, T)
    safe = d.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    metrics = {
        "kl": _mean(-d, keep),
        "k3_kl": _mean(torch.exp(safe) - safe - 1.0, keep),
        "log_prob_abs_diff_max": _max(d.abs(), keep),
        "log_prob_abs_diff_mean": _mean(d.abs(), keep),
    }
    return {CORR + k: v for k, v in metrics.items()}


@dataclass(frozen=True)
class Correction:
    """What ``rollout_correction`` decided for a batch."""

    weights: torch.Tensor | None
    """(B, T) detached importance weights (0 outside the input mask), or None."""
    mask: torch.Tensor
    """(B, T) the input mask, zero where rejection or the veto removed a token."""
    metrics: dict[str, float]
    """``rollout_corr/...`` figures: mismatch, weights, rejection, veto."""


def rollout_correction(
    logp_proximal: torch.Tensor,
    logp_behavior: torch.Tensor,
    mask: torch.Tensor,
    cfg: RolloutCorrectionConfig,
) -> Correction:
    """The decoupled-mode correction of one batch: logp_proximal (B, T) recomputed by the
    learner, logp_behavior (B, T) recorded at rollout, mask (B, T) of the counted tokens.

    Weights and rejection are both read from the ratio over ``mask`` (rejection does not
    change the weights of the tokens it keeps, as in verl). The caller trains on
    ``Correction.mask`` and multiplies each token's surrogate by ``Correction.weights``.
    """
    keep = mask.bool()
    # padding and masked positions may hold anything (NaN log-probs of a dropped sample)
    log_ratio = torch.where(keep, logp_proximal.detach() - logp_behavior.detach(), 0.0)
    metrics = mismatch_metrics(logp_proximal, logp_behavior, mask)
    weights = None
    if cfg.rollout_is is not None:
        weights, m = importance_weights(
            log_ratio, mask, cfg.rollout_is, cfg.rollout_is_threshold,
            cfg.rollout_is_batch_normalize,
        )  # fmt: skip
        metrics.update(m)
    kept = keep
    if cfg.rollout_rs is not None:
        rs_keep, m = rejection_mask(
            log_ratio, mask, cfg.rollout_rs, cfg.rs_threshold_lower, cfg.rs_threshold
        )
        kept = kept & rs_keep
        metrics.update(m)
    if cfg.rollout_token_veto_threshold is not None:
        veto_keep, m = veto_mask(log_ratio, mask, cfg.rollout_token_veto_threshold)
        kept = kept & veto_keep
        metrics.update(m)
    return Correction(weights, torch.where(kept, mask, torch.zeros_like(mask)), metrics)


def stale_rows(lag: torch.Tensor, mask: torch.Tensor, max_staleness: int) -> torch.Tensor:
    """Samples with a counted token older than allowed: lag (B, T), mask (B, T) -> (B,) bool.

    lag = learner version at the step - version that generated the token.
    """
    return ((lag > max_staleness) & mask.bool()).any(dim=-1)


def mask_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, T) with every token of the ``rows`` (B,) bool set to 0."""
    return torch.where(rows.unsqueeze(-1), torch.zeros_like(mask), mask)


def lag_metrics(lag: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The lag distribution of the counted tokens, lag (B, T) and mask (B, T): lag_mean,
    lag_max and the token counts tokens_lag_0 / _1 / _2 / _3plus (lag <= 0 counts as 0: a
    token of a version the learner has not reached yet, after it resumed from an older
    checkpoint)."""
    keep = mask.bool()
    lag = lag.to(torch.float64)
    metrics = {"lag_mean": _mean(lag, keep), "lag_max": _max(lag, keep)}
    clipped = lag.clamp(0, len(LAG_BUCKETS) - 1)
    for i, name in enumerate(LAG_BUCKETS):
        metrics[f"tokens_lag_{name}"] = float((keep & (clipped == i)).sum())
    return {STALE + k: v for k, v in metrics.items()}
