"""The DAPO policy loss as pure functions of tensors.

DAPO (arXiv 2503.14476) departs from GRPO in these ways, each tied to a field of
``proto.runspec``:

1. Clip-Higher: the ratio clip is decoupled, ``clip(r, 1 - eps_low, 1 + eps_high)``
   with eps_high > eps_low, so low-probability tokens can gain mass
   -> ``actor.clip_ratio_low`` / ``actor.clip_ratio_high`` (0.2 / 0.28).
2. Dynamic sampling: groups whose samples are all right or all wrong carry zero
   advantage and are dropped before the batch is formed
   -> ``algorithm.filter_groups`` (see ``dapo.algorithm.dynamic_sampling``).
3. Token-level policy-gradient loss: every response token of the batch has the
   same weight, instead of every sample
   -> ``actor.loss_agg_mode = "token-mean"`` (GRPO: ``"seq-mean-token-mean"``).
4. Overlong reward shaping: a soft length penalty inside the last ``Lcache``
   tokens -> ``reward.overlong_buffer`` (soft punishment, applied by the reward
   service); or truncated samples masked out of the loss
   -> ``actor.overlong_filter`` (see ``apply_overlong_filter``).

Also: no KL term to a reference policy (``actor.use_kl_loss = False``,
``actor.kl_loss_coef = 0``), the optional dual clip for negative advantages
(``actor.clip_ratio_c``, 10 in the DAPO scripts), and, for samples of an older or
numerically different behaviour policy, per-token importance weights multiplying the
clipped surrogate (``is_weights``; computed by ``dapo.algorithm.off_policy`` from
``algorithm.rollout_correction``).

Exact accumulation. Every aggregation is ``numerator / normalizer`` where the
numerator is a plain sum over the rows of the current micro-batch and the
normalizer is computed once from the whole mini-batch (all micro-batches, all
data-parallel ranks) by ``loss_normalizer``. Summing the micro-batch losses
therefore gives the full mini-batch loss and gradient exactly.

Sequence count of ``seq-mean-token-mean`` / ``seq-mean-token-sum``: only rows with at
least one counted token count. A fully masked row (an overlong-filtered, stale or
rejected sample, or an empty padding row added to balance micro-batches) is then exactly
as if it were not in the batch, which matches how ``token-mean`` treats masked tokens;
counting it would instead shrink every other sample's weight. ``seq-mean-token-sum-norm``
divides by a constant instead (see ``loss_normalizer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from proto.runspec import ActorConfig
from proto.vocab import LOSS_AGG_MODES, KLType

Normalizer = float | torch.Tensor

SHARE_METRICS = frozenset({"pg_loss"})
"""Metrics of ``policy_loss`` that are a micro-batch's share of the mini-batch value (sum
them over micro-batches); every other metric is a mean over the micro-batch's tokens."""


def _check_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


def _check_2d(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set; masked entries never leak NaN/inf."""
    keep = mask.bool()
    return torch.where(keep, values, 0.0).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the set entries of ``mask``; 0 when none are set."""
    count = mask.bool().sum().clamp(min=1)
    return masked_sum(values, mask) / count


def loss_normalizer(mask: torch.Tensor, loss_agg_mode: str, horizon: int | None = None) -> float:
    """The denominator of ``agg_loss`` for a whole mini-batch.

    mask: (B, T) response mask of the FULL mini-batch (every micro-batch; sum the
    results of this function over data-parallel ranks, or pass the concatenated
    mask). Returns:

    - token-mean: number of counted tokens;
    - seq-mean-token-mean / seq-mean-token-sum: number of rows with >= 1 counted token;
    - seq-mean-token-sum-norm: ``horizon`` alone, a constant such as
      ``data.max_response_length`` (required, so it cannot drift with padding).

    seq-mean-token-sum-norm is verl's ``agg_loss``: sum(seq_losses) / loss_scale_factor,
    the rows' token sums added (no mean over rows; Dr. GRPO's constant normaliser) and
    divided by the constant, applied here to the whole mini-batch. verl's FSDP actor also
    divides each micro-batch's value by the number of micro-batches, which makes the
    loss depend on the micro-batch size; that factor is left out, so the loss is the same
    for every micro-batch size (what verl's newer engine path computes on one rank).

    An all-masked mini-batch gives 1 (for -norm, ``horizon``), so its loss is 0, not NaN.
    """
    _check_mode(loss_agg_mode)
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    keep = mask.bool()
    if loss_agg_mode == "token-mean":
        return float(max(int(keep.sum()), 1))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if horizon is None or horizon <= 0:
            raise ValueError(
                f"seq-mean-token-sum-norm needs a positive constant horizon, got {horizon!r}"
            )
        return float(horizon)
    return float(max(int(keep.any(dim=-1).sum()), 1))


def agg_loss(
    values: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, normalizer: Normalizer
) -> torch.Tensor:
    """Aggregate per-token ``values`` (B, T) into a scalar, divided by ``normalizer``.

    token-mean / seq-mean-token-sum / seq-mean-token-sum-norm: sum of masked values;
    seq-mean-token-mean: sum over rows of each row's masked token mean (an empty
    row contributes 0). Divided by ``normalizer`` from ``loss_normalizer``.
    """
    _check_mode(loss_agg_mode)
    _check_2d("values", values, mask.shape)
    if not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer!r}")
    keep = mask.bool()
    v = torch.where(keep, values, 0.0)  # (B, T)
    if loss_agg_mode == "seq-mean-token-mean":
        row_tokens = keep.sum(dim=-1).clamp(min=1)  # (B,), 1 for empty rows: 0 / 1 = 0
        total = (v.sum(dim=-1) / row_tokens).sum()
    else:
        total = v.sum()
    return total / normalizer


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) from logits (B, T, V) and token ids (B, T) -> (B, T).

    Uses the fused cross-entropy kernel, so no (B, T, V) log-softmax is kept
    beyond what backward needs. Half-precision logits are upcast to float32.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits (B, T, V) and tokens (B, T) disagree: {tuple(logits.shape)} vs "
            f"{tuple(tokens.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    b, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * t, v), tokens.reshape(b * t), reduction="none")
    return -nll.view(b, t)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, T, V) -> (B, T).

    Computed from log_softmax (stable for large logits); tokens with zero
    probability (logit -inf) contribute 0 and keep the gradient finite.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    # clamp keeps 0 * log 0 at 0 instead of 0 * -inf = NaN, value and gradient alike
    finite_logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * finite_logp).sum(dim=-1)


def kl_penalty(
    logp_new: torch.Tensor,
    logp_ref: torch.Tensor,
    kl_type: KLType,
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """Per-token estimate of KL(new || ref) from samples of the new policy.

    k1 = logp_new - logp_ref; k3 = exp(d) - d - 1 with d = logp_ref - logp_new
    (non-negative, low variance); d is clamped to +-log_ratio_clamp before exp.
    """
    ref = logp_ref.detach()
    if kl_type == "k1":
        return logp_new - ref
    if kl_type == "k3":
        d = (ref - logp_new).clamp(-log_ratio_clamp, log_ratio_clamp)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_loss_type must be 'k1' or 'k3', got {kl_type!r}")


def apply_overlong_filter(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Mask out every token of truncated samples: mask (B, T), truncated (B,) bool -> (B, T)."""
    if truncated.shape != mask.shape[:1]:
        raise ValueError(
            f"truncated must have shape ({mask.shape[0]},), got {tuple(truncated.shape)}"
        )
    drop = truncated.bool().unsqueeze(-1)  # (B, 1)
    return torch.where(drop, torch.zeros_like(mask), mask)


def clipped_surrogate(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss with Clip-Higher and optional dual clip.

    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0 and
    clip_c set, l = min(l, -A clip_c). Returns (l, dual_clip_active), both (B, T).
    """
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if clip_c is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    bound = -adv * clip_c  # (B, T), constant: the gradient is 0 where it binds
    dual = (adv < 0) & (loss > bound)
    return torch.where(dual, bound, loss), dual


def _clip_metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    dual: torch.Tensor,
    keep: torch.Tensor,
    cfg: ActorConfig,
) -> dict[str, torch.Tensor]:
    high = (adv > 0) & (ratio > 1.0 + cfg.clip_ratio_high)
    low = (adv < 0) & (ratio < 1.0 - cfg.clip_ratio_low)
    return {
        "pg_clipfrac_high": masked_mean(high.to(ratio.dtype), keep),
        "pg_clipfrac_low": masked_mean(low.to(ratio.dtype), keep),
        "pg_clipfrac_dual": masked_mean(dual.to(ratio.dtype), keep),
    }


def _surrogate_inputs(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    log_ratio_clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked shapes, then (keep, adv, log_ratio, ratio), all (B, T).

    Masked positions are zeroed before any nonlinearity, so garbage there (inf/NaN
    log-probs of padding) can reach neither the loss nor the gradient.
    """
    shape = logp_new.shape
    if logp_new.dim() != 2:
        raise ValueError(f"logp_new must be (B, T), got shape {tuple(shape)}")
    for name, x in (("logp_old", logp_old), ("mask", mask)):
        _check_2d(name, x, shape)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(shape)  # (B,) -> (B, T)
    _check_2d("advantages", advantages, shape)
    keep = mask.bool()
    adv = torch.where(keep, advantages.detach().to(logp_new.dtype), 0.0)  # (B, T)
    log_ratio = torch.where(keep, logp_new - logp_old.detach(), 0.0)  # (B, T)
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp))  # (B, T)
    return keep, adv, log_ratio, ratio


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: ActorConfig,
    *,
    normalizer: Normalizer,
    is_weights: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DAPO loss of one micro-batch, to be SUMMED over micro-batches.

    logp_new (B, T): log-probs of the sampled tokens under the policy being trained
    (carries the gradient). logp_old (B, T): the same under the PPO anchor (the proximal
    policy recomputed by the learner, or the behaviour policy in bypass mode).
    advantages: (B, T) or (B,). mask (B, T): 1 for response tokens that count (after the
    overlong filter, staleness and rejection masks). normalizer: ``loss_normalizer`` of
    the whole mini-batch for ``cfg.loss_agg_mode``. is_weights (B, T): detached
    importance weights multiplying each token's clipped surrogate (decoupled PPO, see
    ``dapo.algorithm.off_policy``); None = 1. logp_ref (B, T): reference-policy
    log-probs, required when ``cfg.use_kl_loss``. logits (B, T, V) or entropy (B, T): for
    the entropy metric and bonus (required when ``cfg.entropy_coeff > 0``; entropy wins).

    Returns (loss, metrics). Metrics are detached 0-dim tensors. Those in
    ``SHARE_METRICS`` (pg_loss: the policy term) are this micro-batch's share of the
    mini-batch value: summed over the micro-batches they give it exactly. The others are
    means over this micro-batch's counted tokens (weight them by its token count):
    pg_clipfrac_high, pg_clipfrac_low, pg_clipfrac_dual, ppo_kl, plus entropy / kl_ref
    when present.
    """
    keep, adv, log_ratio, ratio = _surrogate_inputs(
        logp_new, logp_old, advantages, mask, cfg.log_ratio_clamp
    )
    per_token, dual = clipped_surrogate(
        ratio, adv, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )  # (B, T)
    if is_weights is not None:
        _check_2d("is_weights", is_weights, keep.shape)
        per_token = per_token * torch.where(keep, is_weights.detach(), 1.0)
    metrics: dict[str, torch.Tensor] = {}
    pg_loss = agg_loss(per_token, keep, cfg.loss_agg_mode, normalizer)
    loss = pg_loss
    loss = loss + _entropy_term(cfg, keep, normalizer, logits, entropy, metrics)
    loss = loss + _kl_term(logp_new, logp_ref, keep, cfg, normalizer, metrics)
    with torch.no_grad():
        metrics["pg_loss"] = pg_loss.detach()
        metrics["ppo_kl"] = masked_mean(-log_ratio, keep)
        metrics.update(_clip_metrics(ratio, adv, dual, keep, cfg))
    return loss, metrics


def _entropy_term(
    cfg: ActorConfig,
    keep: torch.Tensor,
    normalizer: Normalizer,
    logits: torch.Tensor | None,
    entropy: torch.Tensor | None,
    metrics: dict[str, torch.Tensor],
) -> torch.Tensor | float:
    """-entropy_coeff * agg(entropy); records the entropy metric when it is available."""
    bonus = cfg.entropy_coeff > 0
    if entropy is None and logits is not None:
        # without a bonus the entropy is only a metric: no graph for a (B, T, V) op
        with torch.set_grad_enabled(bonus and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    if entropy is None:
        if bonus:
            raise ValueError("actor.entropy_coeff > 0 needs logits or entropy")
        return 0.0
    _check_2d("entropy", entropy, keep.shape)
    metrics["entropy"] = masked_mean(entropy.detach(), keep)
    if not bonus:
        return 0.0
    return -cfg.entropy_coeff * agg_loss(entropy, keep, cfg.loss_agg_mode, normalizer)


def _kl_term(
    logp_new: torch.Tensor,
    logp_ref: torch.Tensor | None,
    keep: torch.Tensor,
    cfg: ActorConfig,
    normalizer: Normalizer,
    metrics: dict[str, torch.Tensor],
) -> torch.Tensor | float:
    """kl_loss_coef * agg(KL to the reference); records kl_ref when logp_ref is given."""
    if logp_ref is None:
        if cfg.use_kl_loss:
            raise ValueError("actor.use_kl_loss is set but logp_ref was not given")
        return 0.0
    _check_2d("logp_ref", logp_ref, keep.shape)
    # masked positions see logp_new == logp_ref == 0: KL 0 and no gradient there
    new = torch.where(keep, logp_new, 0.0)
    ref = torch.where(keep, logp_ref.detach(), 0.0)
    kl = kl_penalty(new, ref, cfg.kl_loss_type, cfg.log_ratio_clamp)  # (B, T)
    metrics["kl_ref"] = masked_mean(kl.detach(), keep)
    if not cfg.use_kl_loss:
        return 0.0
    return cfg.kl_loss_coef * agg_loss(kl, keep, cfg.loss_agg_mode, normalizer)
