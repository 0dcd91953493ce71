"""The trainer's off-policy objective on a tiny Qwen2: which policy anchors PPO, importance
weights and rejection from the behaviour log-probs, stale samples masked at training time,
and the figures (to metrics.jsonl and Prometheus) that show it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from proto.messages import TrainingBatch
from services.learner.batching import pack_batch
from services.learner.metrics import LearnerMetrics
from services.learner.trainer import Trainer
from tests.services.learner.test_trainer import BYPASS, restamp, rollout_batch, spec, tiny_model

torch.set_num_threads(1)

DECOUPLED_NO_IS = {"max_staleness": 0, "rollout_correction": {"rollout_is": None}}


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def edit_samples(batch: TrainingBatch, edit) -> TrainingBatch:
    """``edit(g, s, sample) -> dict of fields to replace`` applied to every sample."""
    groups = []
    for gi, g in enumerate(batch.groups):
        samples = [s.model_copy(update=edit(gi, si, s)) for si, s in enumerate(g.samples)]
        oldest = min(int(s.versions[0]) for s in samples)
        groups.append(g.model_copy(update={"samples": samples, "policy_version": oldest}))
    return batch.model_copy(update={"groups": groups})


def shift_logprobs(batch: TrainingBatch, delta: float, where=lambda g, s: True) -> TrainingBatch:
    return edit_samples(
        batch,
        lambda g, s, smp: {"logprobs": smp.logprobs + np.float32(delta)} if where(g, s) else {},
    )


def learner_logprobs(model, batch: TrainingBatch) -> TrainingBatch:
    """The batch with its behaviour log-probs replaced by the learner's own."""
    trainer = Trainer(copy.deepcopy(model), spec(), "cpu", pad_id=0)
    packed = pack_batch(batch, 0, True)
    with torch.no_grad():
        logp, _ = trainer.forward_logp(trainer.model.eval(), packed)
    rows = iter(range(len(packed)))

    def exact(g, s, smp):
        return {"logprobs": logp[next(rows), : smp.logprobs.size].numpy().astype(np.float32)}

    return edit_samples(batch, exact)


def train(model, batch, cfg, version: int = 0) -> tuple[torch.Tensor, dict, Trainer]:
    trainer = Trainer(copy.deepcopy(model), cfg, "cpu", pad_id=0, version=version)
    figures = trainer.train_batch(batch)
    return params(trainer.model), figures, trainer


def test_decoupled_objective_depends_on_the_behaviour_policy():
    model = tiny_model(torch.float64)
    batch = rollout_batch(copy.deepcopy(model).float())
    off = shift_logprobs(batch, 0.3, where=lambda g, s: s % 2 == 0)
    # no correction: the behaviour log-probs never reach the loss
    a, _, _ = train(model, batch, spec(DECOUPLED_NO_IS))
    b, _, _ = train(model, off, spec(DECOUPLED_NO_IS))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # token-level importance weights proximal / behaviour: they do
    a, fa, _ = train(model, batch, spec())
    b, fb, _ = train(model, off, spec())
    assert (a - b).abs().max() > 1e-6
    assert fb["rollout_corr/k3_kl"] > fa["rollout_corr/k3_kl"]
    assert fb["rollout_corr/rollout_is_mean"] < fa["rollout_corr/rollout_is_mean"]


def test_bypass_anchors_on_the_behaviour_log_probs_and_recomputes_nothing(monkeypatch):
    model = tiny_model(torch.float64)
    batch = learner_logprobs(model, rollout_batch(copy.deepcopy(model).float()))
    # with exact behaviour log-probs, bypass == decoupled without correction
    want, _, _ = train(model, batch, spec(DECOUPLED_NO_IS))
    calls = []
    original = Trainer._fixed_logp
    monkeypatch.setattr(
        Trainer, "_fixed_logp", lambda self, *a: calls.append(1) or original(self, *a)
    )
    got, figures, _ = train(model, batch, spec(BYPASS))
    assert calls == []  # no proximal forward pass
    # equal up to the float32 rounding of the recorded log-probs (Adam's first step is
    # about lr * sign(g): a 1e-8 relative change of g moves only its tiniest entries)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not any(k.startswith("rollout_corr/") for k in figures)  # nothing recomputed
    # and the behaviour log-probs are the anchor: shifting them moves the update
    moved, _, _ = train(model, shift_logprobs(batch, 0.3), spec(BYPASS))
    assert (moved - want).abs().max() > 1e-4


def test_rejected_tokens_leave_the_loss():
    model = tiny_model(torch.float64)
    batch = learner_logprobs(model, rollout_batch(copy.deepcopy(model).float()))
    cfg = spec({"rollout_correction": {"rollout_is": None, "rollout_rs": "token"}})
    far = shift_logprobs(batch, 5.0, where=lambda g, s: (g, s) == (0, 1))
    farther = shift_logprobs(batch, 9.0, where=lambda g, s: (g, s) == (0, 1))
    a, fa, _ = train(model, far, cfg)
    b, _, _ = train(model, farther, cfg)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # how far off does not matter
    n_tokens = sum(s.length for g in batch.groups for s in g.samples)
    rejected = batch.groups[0].samples[1].length
    assert fa["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(rejected / n_tokens)
    clean, fc, _ = train(model, batch, cfg)
    assert fc["rollout_corr/rollout_rs_masked_fraction"] == 0.0
    assert (clean - a).abs().max() > 1e-6


def test_select_keeps_responses_whole_when_the_mask_has_holes():
    packed = pack_batch(rollout_batch(tiny_model()), 0, True)
    row = int(packed.lengths.argmax())
    n = int(packed.lengths[row])
    packed.mask[row, 0] = 0.0  # a rejected token: the mask no longer counts the length
    sub = packed.select(torch.tensor([row]))
    assert sub.mask.shape[1] == n and sub.mask[0, 1:].all() and sub.mask[0, 0] == 0


def test_stale_samples_are_masked_and_counted():
    model = tiny_model()
    batch = restamp(rollout_batch(model), 3)
    longest = max(range(4), key=lambda s: batch.groups[1].samples[s].length)

    def stamp(g, s, smp):
        if (g, s) == (0, 0):  # every token lag 2: stale, and poisoned
            bad = smp.logprobs.copy()
            bad[:] = np.nan
            return {"versions": np.array([1], dtype=np.int32), "logprobs": bad}
        if (g, s) == (1, longest):  # first token lag 2, the rest lag 0: stale too
            return {"versions": np.array([1, 3], dtype=np.int32),
                    "version_starts": np.array([0, 1], dtype=np.int32)}  # fmt: skip
        if g == 2:  # lag 1: allowed
            return {"versions": np.array([2], dtype=np.int32)}
        return {}

    stamped = edit_samples(batch, stamp)
    before = params(model)
    after, figures, trainer = train(model, stamped, spec(), version=3)
    # the NaN log-probs of the stale sample never reach the loss: the step happened
    assert trainer.version == 4 and figures["skipped_steps"] == 0
    assert (after - before).abs().max() > 0
    assert figures["staleness/dropped_samples"] == 2
    samples = [s for g in stamped.groups for s in g.samples]
    lag2 = samples[0].length + 1
    lag1 = sum(s.length for s in stamped.groups[2].samples)
    assert figures["staleness/tokens_lag_2"] == lag2
    assert figures["staleness/tokens_lag_1"] == lag1
    assert figures["staleness/tokens_lag_0"] == sum(s.length for s in samples) - lag2 - lag1
    assert figures["staleness/tokens_lag_3plus"] == 0
    assert figures["staleness/lag_max"] == 2


def test_a_batch_with_only_stale_samples_trains_nothing():
    model = tiny_model()
    batch = rollout_batch(model)  # version 0, trained at version 5: lag 5 > 1
    after, figures, trainer = train(model, batch, spec(), version=5)
    assert torch.equal(after, params(model))
    assert trainer.version == 5 and trainer.optimizer_steps == 0
    assert figures["staleness/dropped_samples"] == 16 and figures["optimizer_steps"] == 0
    assert figures["staleness/tokens_lag_3plus"] == sum(
        s.length for g in batch.groups for s in g.samples
    )


def test_figures_reach_prometheus():
    model = tiny_model()
    batch = rollout_batch(model)
    _, figures, _ = train(model, batch, spec({"rollout_correction": {"rollout_rs": "token"}}))
    for key in (
        "rollout_corr/rollout_is_mean",
        "rollout_corr/rollout_is_max",
        "rollout_corr/rollout_is_ratio_fraction_high",
        "rollout_corr/rollout_rs_masked_fraction",
        "rollout_corr/kl",
        "rollout_corr/k3_kl",
        "rollout_corr/log_prob_abs_diff_max",
        "staleness/lag_mean",
        "staleness/lag_max",
        "staleness/dropped_samples",
        "pg_loss",
    ):
        assert key in figures, key
    # the HF rollout and the learner agree closely on the same weights
    assert figures["rollout_corr/log_prob_abs_diff_max"] < 1e-3
    assert figures["rollout_corr/rollout_is_mean"] == pytest.approx(1.0, abs=1e-3)
    registry = CollectorRegistry()
    metrics = LearnerMetrics(registry)
    metrics.observe_step({**figures, "step": 1, "train_s": 0.1, "staleness/dropped_samples": 2})
    value = registry.get_sample_value
    assert (
        value("dapo_learner_rollout_corr_rollout_is_mean")
        == figures["rollout_corr/rollout_is_mean"]
    )
    assert value("dapo_learner_rollout_corr_k3_kl") == figures["rollout_corr/k3_kl"]
    assert value("dapo_learner_staleness_lag_max") == 0.0
    assert value("dapo_learner_stale_samples_dropped_total") == 2
    n_tokens = sum(s.length for g in batch.groups for s in g.samples)
    assert value("dapo_learner_token_lag_tokens_total", {"lag": "0"}) == n_tokens
    assert value("dapo_learner_token_lag_tokens_total", {"lag": "3+"}) == 0
