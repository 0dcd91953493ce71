"""One training batch -> optimizer steps with the DAPO loss.

The trainer owns the model, the optimizer and the policy version. Per batch:
old log-probs are fixed first (recomputed with the current weights, or the
rollout's), then each mini-batch of ``ppo_mini_batch_size`` groups is split
into micro-batches whose losses are normalised by the *mini-batch's* token
(or sequence) count, so gradient accumulation is exact. A step whose loss or
gradient norm is not finite is skipped and counted; the version only moves
when the weights do.

The trainer runs on ``ranks`` (``services.learner.ranks``; a world of one
unless given). Over several ranks (an FSDP-sharded model under torchrun, see
``services.learner.distributed``) the micro-batches are dealt over ranks,
padded with zero-loss dummies so every rank runs the same collectives; the
skip test, the gradient norm and the reported figures are global. In a world
of one the sums over ranks are identities and the update is the plain one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from dapo.algorithm.loss import (
    apply_overlong_filter,
    loss_normalizer,
    policy_loss,
    token_log_probs,
)
from proto.messages import TrainingBatch
from proto.runspec import RunSpec
from services.learner.batching import PackedSamples, micro_batches, mini_batches, pack_batch
from services.learner.ranks import Ranks, SoloRanks, padded_share

# figures already identical on every rank (not summed over ranks)
_GLOBAL_FIGURES = ("loss", "grad_norm", "skipped", "lr", "_mini")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def build_optimizer(model: torch.nn.Module, spec: RunSpec) -> torch.optim.AdamW:
    o = spec.actor.optim
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=o.lr,
        betas=o.betas,
        weight_decay=o.weight_decay,
    )


@dataclass
class Trainer:
    model: torch.nn.Module
    spec: RunSpec
    device: str
    pad_id: int
    version: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    ref_model: torch.nn.Module | None = None
    ranks: Ranks = field(default_factory=SoloRanks)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(self.model, self.spec)
        self._set_lr()

    def _set_lr(self) -> float:
        o = self.spec.actor.optim
        lr = o.lr * warmup_factor(self.optimizer_steps, o.lr_warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _autocast(self):
        if not self.spec.actor.bf16_autocast:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def forward_logp(self, model, mb: PackedSamples, with_logits: bool = False):
        """Response log-probs (B, T) at the rollout temperature, and the logits if asked."""
        with self._autocast():
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
        rows = torch.arange(len(mb), device=mb.input_ids.device)[:, None]
        logits = out.logits[rows, mb.resp_pos]  # (B, T, V)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # softmax statistics in full precision
        logits = logits / self.spec.rollout.temperature
        logp = token_log_probs(logits, mb.resp_ids)
        return (logp, logits) if with_logits else (logp, None)

    def _share(self, mbs: list[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
        """(rows, is_dummy) of the micro-batches this rank runs: dealt round-robin over ranks
        (all of them in a world of one), padded with dummies re-running the first."""
        share = padded_share(len(mbs), self.ranks.rank, self.ranks.world)
        return [(mbs[0], True) if i is None else (mbs[i], False) for i in share]

    @torch.no_grad()
    def _fixed_logp(self, model, packed: PackedSamples) -> torch.Tensor:
        out = torch.zeros(packed.mask.shape, dtype=self._logp_dtype())
        size = self.spec.actor.ppo_micro_batch_size
        for rows, dummy in self._share(micro_batches(torch.arange(len(packed)), size)):
            mb = packed.select(rows).to(self.device)
            logp, _ = self.forward_logp(model, mb)
            if not dummy:
                out[rows, : logp.shape[1]] = logp.cpu().to(out.dtype)
        return self.ranks.all_reduce_sum(out)  # rows other ranks computed are 0 here

    def _logp_dtype(self) -> torch.dtype:
        """Log-prob dtype of a forward: float32 under autocast or for half weights."""
        dtype = next(self.model.parameters()).dtype
        if self.spec.actor.bf16_autocast or dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return dtype

    def train_batch(self, batch: TrainingBatch) -> dict[str, float]:
        actor = self.spec.actor
        packed = pack_batch(batch, self.pad_id, self.spec.algorithm.norm_adv_by_std_in_grpo)
        if actor.overlong_filter:
            packed.mask = apply_overlong_filter(packed.mask, packed.truncated)
        self.model.eval()  # dropout off: log-probs must match the rollout policy's
        old = self._fixed_logp(self.model, packed) if actor.recompute_old_log_prob else None
        ref = self._fixed_logp(self.ref_model, packed) if self.ref_model is not None else None
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for _ in range(actor.ppo_epochs):
            for rows in mini_batches(packed, actor.ppo_mini_batch_size):
                stepped = self._mini_batch(packed, rows, old, ref, sums)
                steps += int(stepped)
        local = {k: v for k, v in sums.items() if k not in _GLOBAL_FIGURES}
        sums.update(self.ranks.sum_dicts(local))  # token-weighted figures were summed per rank
        return self._summary(batch, packed, sums, steps)

    def _mini_batch(self, packed, rows, old, ref, sums) -> bool:
        actor = self.spec.actor
        horizon = self.spec.data.max_response_length
        normalizer = loss_normalizer(packed.mask[rows], actor.loss_agg_mode, horizon=horizon)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for mrows, dummy in self._share(micro_batches(rows, actor.ppo_micro_batch_size)):
            mb = packed.select(mrows).to(self.device)
            t = mb.mask.shape[1]
            logp, logits = self.forward_logp(self.model, mb, with_logits=True)
            if dummy:  # same collectives as the other ranks, zero gradient
                (logp * 0.0).sum().backward()
                continue
            logp_old = old[mrows, :t].to(self.device) if old is not None else mb.old_logp_rollout
            loss, m = policy_loss(
                logp,
                logp_old.detach(),
                mb.advantages,
                mb.mask,
                actor,
                normalizer=normalizer,
                logp_behavior=mb.old_logp_rollout if actor.tis_imp_ratio_cap else None,
                logp_ref=ref[mrows, :t].to(self.device) if ref is not None else None,
                logits=logits,
            )
            loss.backward()
            total_loss += float(loss.detach())
            tokens = float(mb.mask.sum())
            for k, v in m.items():
                sums[k] += float(v) * tokens
            sums["_tokens"] += tokens
        total_loss = float(  # every rank must agree on the skip test below
            self.ranks.all_reduce_sum(torch.tensor([total_loss], dtype=torch.float64))[0]
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), actor.optim.grad_clip)
        if isinstance(grad_norm, DTensor):  # FSDP2: already the global norm, replicated
            grad_norm = grad_norm.full_tensor()
        sums["grad_norm"] += float(grad_norm)
        sums["_mini"] += 1
        sums["loss"] += total_loss
        if not (math.isfinite(total_loss) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            sums["skipped"] += 1
            return False
        sums["lr"] = self._set_lr()
        self.optimizer.step()
        self.optimizer_steps += 1
        self.version += 1
        self._set_lr()
        return True

    @torch.no_grad()
    def _summary(self, batch, packed, sums, steps) -> dict[str, float]:
        tokens, mini = max(sums.pop("_tokens", 0.0), 1.0), max(sums.pop("_mini", 0.0), 1.0)
        out = {
            k: v / tokens
            for k, v in sums.items()
            if k not in ("loss", "grad_norm", "skipped", "lr")
        }
        samples = [s for g in batch.groups for s in g.samples]
        st = batch.stats
        seen = st.kept + st.filtered_all_correct + st.filtered_all_wrong
        out.update(
            loss=sums["loss"] / mini,
            grad_norm=sums["grad_norm"] / mini,
            lr=sums.get("lr", self.optimizer.param_groups[0]["lr"]),
            skipped_steps=sums.get("skipped", 0.0),
            optimizer_steps=float(steps),
            reward_mean=sum(s.score for s in samples) / len(samples),
            acc_mean=sum(s.acc for s in samples) / len(samples),
            response_length_mean=float(packed.mask.new_tensor([s.length for s in samples]).mean()),
            overlong_frac=sum(s.truncated for s in samples) / len(samples),
            kept_ratio=st.kept / seen if seen else 1.0,
            version_lag=st.mean_version_lag,
            gen_rounds=float(st.gen_rounds),
            dropped_stale=float(st.dropped_stale),
            version=float(self.version),
        )
        return out

    def state(self) -> dict:
        return {
            "version": self.version,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state(self, state: dict, optimizer_state: dict | None) -> None:
        self.version = int(state["version"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self._set_lr()
