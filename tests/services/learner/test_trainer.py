"""The learner's trainer on a tiny random Qwen2: consistency with the rollout engine,
exact micro-batching, version bumps, non-finite steps skipped, checkpoints that reload."""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dapo.engines.hf import HFEngine
from proto.messages import BatchStats, SamplingParams, ScoredGroup, ScoredSample, TrainingBatch
from proto.runspec import RunSpec
from services.learner.batching import pack_batch
from services.learner.checkpoint import (
    newest_checkpoint,
    read_optimizer_state,
    read_trainer_state,
    save_checkpoint,
)
from services.learner.trainer import Trainer, warmup_factor

torch.set_num_threads(1)


def tiny_model(dtype=torch.float32) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).to(dtype)


def spec(**actor) -> RunSpec:
    return RunSpec.model_validate(
        {
            "data": {"train_batch_size": 4, "max_response_length": 12},
            "rollout": {"n": 4},
            "actor": {
                "ppo_mini_batch_size": 4,
                "ppo_micro_batch_size": 16,
                "optim": {"lr": 1e-2, "lr_warmup_steps": 0},
                **actor,
            },
            "reward": {"overlong_buffer": {"len": 4}},
        }
    )


def rollout_batch(model, n_groups=4, seed=0) -> TrainingBatch:
    engine = HFEngine(copy.deepcopy(model), eos=[1])
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 48, size=int(rng.integers(2, 7))).tolist() for _ in range(n_groups)]
    outs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=seed))
    groups = []
    for gi, (prompt, comps) in enumerate(zip(prompts, outs, strict=True)):
        samples = [
            ScoredSample(
                response_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                versions=[0],
                version_starts=[0],
                score=1.0 if j % 2 else -1.0,
                acc=bool(j % 2),
                overlong_penalty=0.0,
                length=len(c.token_ids),
                truncated=c.finish_reason == "length",
            )
            for j, c in enumerate(comps)
        ]
        groups.append(
            ScoredGroup(
                run_id="r",
                group_id=f"g{gi}",
                prompt_id=str(gi),
                prompt_ids=np.array(prompt),
                ground_truth="1",
                n=4,
                policy_version=0,
                worker_id="w",
                engine="hf",
                gen_seconds=0.0,
                samples=samples,
            )
        )
    return TrainingBatch(run_id="r", batch_id=0, groups=groups, stats=BatchStats(kept=4))


def test_learner_logprobs_match_the_rollout_engine():
    model = tiny_model()
    batch = rollout_batch(model)
    trainer = Trainer(model, spec(), "cpu", pad_id=0)
    packed = pack_batch(batch, 0, True)
    model.eval()
    with torch.no_grad():
        logp, _ = trainer.forward_logp(model, packed)
    torch.testing.assert_close(
        logp * packed.mask, packed.old_logp_rollout * packed.mask, atol=2e-4, rtol=0
    )


def test_micro_batching_gives_the_same_update():
    base = tiny_model(torch.float64)
    batch = rollout_batch(copy.deepcopy(base).float())
    params = []
    for micro in (16, 3, 1):
        model = copy.deepcopy(base)
        Trainer(model, spec(ppo_micro_batch_size=micro), "cpu", pad_id=0).train_batch(batch)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(params[0], params[2], rtol=0, atol=1e-10)
    assert not torch.equal(params[0], torch.cat([p.flatten() for p in base.parameters()]))


def test_one_version_per_optimizer_step():
    model = tiny_model()
    batch = rollout_batch(model)
    trainer = Trainer(model, spec(ppo_mini_batch_size=2), "cpu", pad_id=0)
    figures = trainer.train_batch(batch)
    assert trainer.version == 2 and figures["optimizer_steps"] == 2
    assert {"loss", "entropy", "pg_clipfrac_high", "grad_norm", "kept_ratio"} <= figures.keys()


def test_non_finite_step_is_skipped_and_weights_unchanged():
    model = tiny_model()
    batch = rollout_batch(model)
    poisoned = batch.model_copy(deep=True)
    s0 = poisoned.groups[0].samples[0]
    bad = s0.logprobs.copy()
    bad[0] = np.nan
    poisoned.groups[0].samples[0] = s0.model_copy(update={"logprobs": bad})
    trainer = Trainer(model, spec(recompute_old_log_prob=False), "cpu", pad_id=0)
    before = [p.detach().clone() for p in model.parameters()]
    figures = trainer.train_batch(poisoned)
    assert trainer.version == 0 and trainer.skipped_steps == 1 and figures["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_warmup_is_linear_then_constant():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_checkpoint_reloads_with_plain_from_pretrained(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, spec(), "cpu", pad_id=0)
    trainer.train_batch(rollout_batch(model))
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model, None, trainer.state(), trainer.optimizer)
    ckpt = save_checkpoint(root, 2, model, None, trainer.state(), trainer.optimizer)
    assert newest_checkpoint(root) == ckpt
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    state = read_trainer_state(ckpt)
    assert state["step"] == 2 and state["version"] == trainer.version
    resumed = Trainer(loaded, spec(), "cpu", pad_id=0)
    resumed.load_state(state, read_optimizer_state(ckpt))
    assert resumed.version == trainer.version and resumed.optimizer_steps == 1
