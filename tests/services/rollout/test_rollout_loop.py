"""The rollout loop on the in-memory bus with the real Hugging Face engine: G samples per
prompt with their log-probs, the policy version that made them, weights taken between
generation batches, and one group per prompt task however often it is delivered."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dapo.engines.hf import HFEngine
from proto.runspec import RunSpec
from services.rollout.service import RolloutWorker
from tests.e2e_helpers import make_model_dir
from tests.factories import prompt_task

SPEC = RunSpec.model_validate(
    {
        "data": {"train_batch_size": 2, "max_response_length": 6},
        "rollout": {"n": 3},
        "actor": {"ppo_mini_batch_size": 2},
        "reward": {"overlong_buffer": {"enable": False}},
    }
)


class QueuedUpdates:
    """Weight updates handed over in-process: each queued (version, tensors) is loaded into
    the engine at the next poll, as the real receiver does after a broadcast."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine, self.queue = engine, []

    def poll(self, timeout_s: float = 0.0) -> int | None:
        if not self.queue:
            return None
        version, tensors = self.queue.pop(0)
        self.engine.load_weights(tensors)
        return version


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("model"))
    return HFEngine(str(path), AutoTokenizer.from_pretrained(str(path)), device="cpu")


def test_groups_carry_samples_logprobs_and_the_generating_version(memory_context, engine):
    ctx = memory_context(SPEC, "rollout")
    updates = QueuedUpdates(engine)
    worker = RolloutWorker(ctx, engine, updates, "hf", version=0, max_prompts=2)
    for i in range(3):
        ctx.bus.publish("prompts", prompt_task(ctx.run_id, i, n=3, max_new_tokens=6))
    assert worker.step() == 2  # max_prompts per generation batch
    head = {n: t.clone() for n, t in engine.named_parameters() if n == "lm_head.weight"}
    updates.queue.append((7, [("lm_head.weight", head["lm_head.weight"] * 0.5)]))
    assert worker.step() == 1
    groups = ctx.bus.read("rollouts")[1]
    assert [g.group_id for g in groups] == ["g0", "g1", "g2"]
    assert [g.policy_version for g in groups] == [0, 0, 7]  # loaded between batches
    for g in groups:
        assert g.n == 3 == len(g.samples) and g.worker_id == "rollout-0"
        for s in g.samples:
            assert 1 <= s.response_ids.size <= 6 and s.logprobs.shape == s.response_ids.shape
            assert (s.logprobs <= 0).all() and s.finish_reason in ("stop", "length")
    assert torch.equal(
        dict(engine.named_parameters())["lm_head.weight"], head["lm_head.weight"] * 0.5
    )
    assert ctx.bus.lag("prompts")["rollout"].pending == 0


def test_a_prompt_delivered_twice_yields_one_group(memory_context, engine):
    ctx = memory_context(SPEC, "rollout")
    task = prompt_task(ctx.run_id, 1, n=3, max_new_tokens=6)
    ctx.bus.publish("prompts", task)
    ctx.bus.publish("prompts", task)  # the sampler's dispatch redelivered after a crash
    worker = RolloutWorker(ctx, engine, QueuedUpdates(engine), "hf", max_prompts=4)
    worker.step()
    assert [g.group_id for g in ctx.bus.read("rollouts")[1]] == ["g1"]
