"""The rollout loop on the in-memory bus with the real Hugging Face engine: G samples per
prompt with their log-probs, the policy versions that made them, weights taken between
generation batches and between the decode steps of a generation, and one group per prompt
task however often it is delivered."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dapo.engines.hf import HFEngine
from proto.messages import SamplingParams
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
    """Weight updates handed over in-process: each pushed (version, tensors) is loaded into
    the engine at a later poll, as the real receiver does after a broadcast. ``skip`` polls
    pass first: the worker polls before each batch and, through the engine, before every
    forward pass of a generation, so a skip lands an update inside one."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine, self.queue, self.polls = engine, [], 0

    def push(self, version: int, tensors, skip: int = 0) -> None:
        self.queue.append((self.polls + skip, version, tensors))

    def poll(self, timeout_s: float = 0.0) -> int | None:
        self.polls += 1
        if not self.queue or self.queue[0][0] >= self.polls:
            return None
        _, version, tensors = self.queue.pop(0)
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
    updates.push(7, [("lm_head.weight", head["lm_head.weight"] * 0.5)])
    assert worker.step() == 1
    groups = ctx.bus.read("rollouts")[1]
    assert [g.group_id for g in groups] == ["g0", "g1", "g2"]
    assert [g.policy_version for g in groups] == [0, 0, 7]  # loaded between batches
    for g in groups:
        assert all(s.versions.tolist() == [g.policy_version] for s in g.samples)
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


def test_an_update_during_a_generation_starts_a_segment_of_its_samples(memory_context, engine):
    ctx = memory_context(SPEC, "rollout")
    updates = QueuedUpdates(engine)
    worker = RolloutWorker(ctx, engine, updates, "hf", version=3, max_prompts=1)
    task = prompt_task(ctx.run_id, 0)
    sampling = SamplingParams(n=4, max_new_tokens=12, seed=0)
    ctx.bus.publish("prompts", task.model_copy(update={"sampling": sampling}))
    head = dict(engine.named_parameters())["lm_head.weight"].clone()
    # polls: 1 before the batch, 2 before the prompt pass, 3 before token 1, 4 before token 2
    updates.push(4, [("lm_head.weight", head * 0.5)], skip=3)
    try:
        assert worker.step() == 1
    finally:
        engine.load_weights([("lm_head.weight", head)])  # the module's engine, as it was
    (group,) = ctx.bus.read("rollouts")[1]
    assert group.policy_version == 3 and worker.version == 4  # the oldest token's version
    lengths = [s.response_ids.size for s in group.samples]
    assert max(lengths) > 2, lengths  # the seed makes samples outlive the update
    for s in group.samples:
        split = s.response_ids.size > 2
        assert s.versions.tolist() == ([3, 4] if split else [3])
        assert s.version_starts.tolist() == ([0, 2] if split else [0])
        assert s.token_versions().tolist()[:3] == [3, 3, 4][: s.response_ids.size]
