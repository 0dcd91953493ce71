"""One training batch (a training step) -> optimizer steps with the DAPO loss.

The trainer owns the model, the optimizer and three counters: ``training_steps``
(batches trained), ``optimizer_steps`` and the policy ``version``, which moves by one
per training step whose update changed the weights (at least one optimizer step), so
"lag = learner version at the step - version that generated a token" counts training
steps. The learning-rate schedule moves once per training step too: every mini-batch of
step k uses lr * min(1, (k + 1) / lr_warmup_steps), verl's meaning.

Per batch, before any update: samples with a token older than ``algorithm.max_staleness``
versions are masked out entirely (and counted); the PPO anchor is fixed (in decoupled mode
the proximal log-probs, recomputed with the current weights, with the importance weights
and rejection masks of ``algorithm.rollout_correction`` read from their ratio to the
behaviour log-probs; in bypass mode the behaviour log-probs themselves). Then each
mini-batch of ``ppo_mini_batch_size`` groups is split into micro-batches whose losses are
normalised by the *mini-batch's* token (or sequence) count, so gradient accumulation is
exact. A mini-batch with no counted token takes no step; one whose loss or gradient norm
is not finite is skipped and counted.

The trainer runs on ``ranks`` (``services.learner.ranks``; a world of one
unless given). Over several ranks (an FSDP-sharded model under torchrun, see
``services.learner.distributed``) the micro-batches are dealt over ranks,
padded with zero-loss dummies so every rank runs the same collectives; the
skip test, the gradient norm and the reported figures are global. In a world
of one the sums over ranks are identities and the update is the plain one.

Compute: log-probs come from ``services.learner.logprobs`` (the head run a chunk of
positions at a time, never the whole response's vocabulary-sized logits). With
``actor.fsdp_config.mixed_precision.param_dtype: bf16`` (or ``actor.bf16_autocast``) the
forward and backward run under bf16 autocast; the parameters, their gradients and the
optimizer state stay in ``model.dtype`` (a sharded model also gathers its parameters in
bf16: ``services.learner.model_init``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from dapo.algorithm.loss import SHARE_METRICS, apply_overlong_filter, loss_normalizer, policy_loss
from dapo.algorithm.off_policy import lag_metrics, mask_rows, rollout_correction, stale_rows
from proto.messages import TrainingBatch
from proto.runspec import RunSpec
from services.learner.batching import PackedSamples, micro_batches, mini_batches, pack_batch
from services.learner.logprobs import CHUNK, response_log_probs
from services.learner.ranks import Ranks, SoloRanks, padded_share

# figures already identical on every rank (not summed over ranks)
_GLOBAL_FIGURES = ("loss", "grad_norm", "skipped", "_mini")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` training steps, then constant; ``step`` is
    the 0-based index of the training step."""
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
    training_steps: int = 0
    ref_model: torch.nn.Module | None = None
    ranks: Ranks = field(default_factory=SoloRanks)
    logprob_chunk: int = CHUNK
    """Response positions per head chunk (``services.learner.logprobs``)."""
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(self.model, self.spec)
        self._set_lr()

    def _set_lr(self) -> float:
        """The learning rate of training step ``training_steps`` (the next one)."""
        o = self.spec.actor.optim
        lr = o.lr * warmup_factor(self.training_steps, o.lr_warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    @property
    def bf16_compute(self) -> bool:
        """Whether forward and backward run in bf16 (the parameters staying in model.dtype)."""
        actor = self.spec.actor
        return actor.bf16_autocast or actor.fsdp_config.mixed_precision.compute_dtype is not None

    def _autocast(self):
        if not self.bf16_compute:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def forward_logp(self, model, mb: PackedSamples, with_entropy: bool = False):
        """Response log-probs (B, T) at the rollout temperature and, if asked, the entropies
        (B, T), with a gradient only for an entropy bonus."""
        with self._autocast():
            return response_log_probs(
                model,
                mb.input_ids,
                mb.attention_mask,
                mb.resp_pos,
                mb.resp_ids,
                temperature=self.spec.rollout.temperature,
                chunk=self.logprob_chunk,
                with_entropy=with_entropy,
                entropy_grad=self.spec.actor.entropy_coeff > 0,
            )

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
        if self.bf16_compute or dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return dtype

    def train_batch(self, batch: TrainingBatch) -> dict[str, float]:
        """One training step on ``batch``; its figures (identical on every rank)."""
        actor = self.spec.actor
        packed = pack_batch(batch, self.pad_id, self.spec.algorithm.norm_adv_by_std_in_grpo)
        lr = self.optimizer.param_groups[0]["lr"]
        figures = self._drop_stale(packed)
        if actor.overlong_filter:
            packed.mask = apply_overlong_filter(packed.mask, packed.truncated)
        self.model.eval()  # dropout off: log-probs must match the rollout policy's
        old, is_weights = self._anchor(packed, figures)
        ref = self._fixed_logp(self.ref_model, packed) if self.ref_model is not None else None
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for _ in range(actor.ppo_epochs):
            for rows in mini_batches(packed, actor.ppo_mini_batch_size):
                stepped = self._mini_batch(packed, rows, (old, is_weights, ref), sums)
                steps += int(stepped)
        local = {k: v for k, v in sums.items() if k not in _GLOBAL_FIGURES}
        sums.update(self.ranks.sum_dicts(local))  # token-weighted figures were summed per rank
        self.training_steps += 1
        self.version += int(steps > 0)  # one version per step that changed the weights
        self._set_lr()
        return {**self._summary(batch, packed, sums, steps), **figures, "lr": lr}

    def _drop_stale(self, packed: PackedSamples) -> dict[str, float]:
        """Masks out every sample with a token older than ``algorithm.max_staleness``
        versions; the lag figures of the batch's tokens and the samples dropped."""
        lag = self.version - packed.versions  # (B, T): training steps since each token
        figures = lag_metrics(lag, packed.mask)
        stale = stale_rows(lag, packed.mask, self.spec.algorithm.max_staleness)  # (B,)
        packed.mask = mask_rows(packed.mask, stale)
        figures["staleness/dropped_samples"] = float(stale.sum())
        return figures

    def _anchor(self, packed: PackedSamples, figures: dict[str, float]):
        """(old, is_weights): the PPO anchor's log-probs (B, T), None for the behaviour ones
        (bypass mode), and the importance weights (B, T) or None. In decoupled mode the
        proximal log-probs are recomputed and the correction's rejection is applied to
        ``packed.mask``; its figures are added to ``figures``."""
        corr = self.spec.algorithm.rollout_correction
        if corr.bypass_mode:
            return None, None
        old = self._fixed_logp(self.model, packed)
        c = rollout_correction(old, packed.old_logp_rollout.to(old.dtype), packed.mask, corr)
        packed.mask = c.mask
        figures.update(c.metrics)
        return old, c.weights

    def _mini_batch(self, packed, rows, fixed, sums) -> bool:
        """One optimizer step on the mini-batch ``rows``; whether the weights changed."""
        actor = self.spec.actor
        if not bool(packed.mask[rows].any()):  # all masked: nothing to learn, no step
            return False
        horizon = self.spec.data.max_response_length
        normalizer = loss_normalizer(packed.mask[rows], actor.loss_agg_mode, horizon=horizon)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for mrows, dummy in self._share(micro_batches(rows, actor.ppo_micro_batch_size)):
            total_loss += self._micro_batch(packed, mrows, dummy, fixed, normalizer, sums)
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
        self.optimizer.step()
        self.optimizer_steps += 1
        return True

    def _micro_batch(self, packed, mrows, dummy, fixed, normalizer, sums) -> float:
        """Forward and backward of one micro-batch; its loss (0 for a dummy)."""
        old, is_weights, ref = fixed
        mb = packed.select(mrows).to(self.device)
        t = mb.mask.shape[1]
        logp, entropy = self.forward_logp(self.model, mb, with_entropy=True)
        if dummy:  # same collectives as the other ranks, zero gradient
            (logp * 0.0).sum().backward()
            return 0.0

        def rows_of(x):  # (B, T) batch tensor -> this micro-batch's rows, trimmed to T
            return None if x is None else x[mrows, :t].to(self.device)

        loss, m = policy_loss(
            logp,
            mb.old_logp_rollout if old is None else rows_of(old),
            mb.advantages,
            mb.mask,
            self.spec.actor,
            normalizer=normalizer,
            is_weights=rows_of(is_weights),
            logp_ref=rows_of(ref),
            entropy=entropy,
        )
        loss.backward()
        tokens = float(mb.mask.sum())
        for k, v in m.items():  # shares add up to the mini-batch value; means by tokens
            sums[k] += float(v) if k in SHARE_METRICS else float(v) * tokens
        sums["_tokens"] += tokens
        return float(loss.detach())

    @torch.no_grad()
    def _summary(self, batch, packed, sums, steps) -> dict[str, float]:
        tokens, mini = max(sums.pop("_tokens", 0.0), 1.0), max(sums.pop("_mini", 0.0), 1.0)
        out = {
            k: v / (mini if k in SHARE_METRICS else tokens)
            for k, v in sums.items()
            if k not in ("loss", "grad_norm", "skipped")
        }
        samples = [s for g in batch.groups for s in g.samples]
        st = batch.stats
        seen = st.kept + st.filtered_all_correct + st.filtered_all_wrong
        out.update(
            loss=sums["loss"] / mini,
            grad_norm=sums["grad_norm"] / mini,
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
        """The counters ``trainer_state.json`` keeps."""
        return {
            "version": self.version,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "training_steps": self.training_steps,
        }

    def load_state(self, state: dict, optimizer_state: dict | None) -> None:
        """Counters (a state without ``training_steps`` falls back on the checkpoint's
        ``step``, the batches trained) and optimizer state; the learning rate follows."""
        self.version = int(state["version"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.training_steps = int(state.get("training_steps", state.get("step", 0)))
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self._set_lr()
