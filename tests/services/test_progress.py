"""The watchdog's gauge: every service context exports when its service last got work done
(dapo_last_progress_timestamp_seconds{component=...}), and each loop moves it at its own
progress point: a group published (rollout), scored (reward), absorbed or a batch out
(sampler), a step trained (learner); idling moves nothing."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from dapo.data.dataset import load_dataset
from dapo.data.prompts import PromptSource
from dapo.engines.hf import HFEngine
from dapo.runtime.runs import MemoryRunStore
from dapo.runtime.service import PROGRESS_METRIC, ServiceContext
from dapo.transport.memory_bus import MemoryBus
from proto.runspec import RunSpec
from services.reward.service import RewardWorker
from services.rollout.service import RolloutWorker
from services.sampler.service import Sampler, SamplerMetrics
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.factories import prompt_task, rollout_group, scored_group
from tests.services.learner.test_service import batch, publish_batch, start_learner, train_next

SPEC = RunSpec.model_validate(
    {
        "data": {"train_batch_size": 2, "max_prompt_length": 32, "max_response_length": 6},
        "rollout": {"n": 2},
        "actor": {"ppo_mini_batch_size": 2},
        "reward": {"overlong_buffer": {"enable": False}},
        "trainer": {"total_training_steps": 3, "max_in_flight": 4},
    }
)


def last_progress(ctx: ServiceContext) -> float:
    return ctx.registry.get_sample_value(PROGRESS_METRIC, {"component": ctx.kind})


class Clock:
    """The gauge's value before a call, to see whether the call moved it."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.mark()

    def mark(self) -> None:
        self.before = last_progress(self.ctx)
        time.sleep(0.01)

    def moved(self) -> bool:
        moved = last_progress(self.ctx) > self.before
        self.mark()
        return moved


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def test_a_context_exports_its_start_and_each_progress():
    started = time.time()
    ctx = ServiceContext("reward", "r1", SPEC, "reward-0", MemoryBus("r1"), MemoryRunStore())
    assert started <= last_progress(ctx) <= time.time()  # the start counts: age from there
    clock = Clock(ctx)
    ctx.progress()
    assert clock.moved()
    registry = CollectorRegistry()  # one gauge per context's registry, as each process has
    other = ServiceContext("rollout", "r1", SPEC, "rollout-0", MemoryBus("r1"), MemoryRunStore(),
                           registry)  # fmt: skip
    assert registry.get_sample_value(PROGRESS_METRIC, {"component": "rollout"}) > 0
    assert last_progress(other) is not None and other.registry is not ctx.registry


def test_reward_progresses_per_scored_read(memory_context, byte_tokenizer):
    ctx = memory_context(SPEC, "reward")
    worker, clock = RewardWorker(ctx, byte_tokenizer), Clock(ctx)
    assert worker.step() == 0 and not clock.moved()
    ctx.bus.publish("rollouts", rollout_group(ctx.run_id, "a", [[50, 256], [51, 256]]))
    assert worker.step() == 1 and clock.moved()


def test_sampler_progresses_per_absorbed_group_and_batch(memory_context, byte_tokenizer, tmp_path):
    ctx = memory_context(SPEC, "sampler")
    rows = load_dataset(make_dataset(tmp_path / "d.jsonl", n=5))
    sampler = Sampler(ctx, SPEC, PromptSource(rows, byte_tokenizer, SPEC.data),
                      SamplerMetrics(ctx.registry))  # fmt: skip
    clock = Clock(ctx)
    sampler.step()  # dispatching prompts is no progress of the run by itself
    assert not clock.moved()
    for gid in ("g0", "g1"):
        ctx.bus.publish("scored", scored_group(ctx.run_id, gid, [True, False]))
    sampler.step()
    assert clock.moved() and ctx.bus.length("batches") == 1


def test_rollout_progresses_per_published_read(memory_context, model_dir):
    ctx = memory_context(SPEC, "rollout")
    engine = HFEngine(str(model_dir), AutoTokenizer.from_pretrained(str(model_dir)), device="cpu")
    no_updates = type("NoUpdates", (), {"poll": lambda self, timeout_s=0.0: None})()
    worker, clock = RolloutWorker(ctx, engine, no_updates, "hf", version=0), Clock(ctx)
    assert worker.step() == 0 and not clock.moved()
    ctx.bus.publish("prompts", prompt_task(ctx.run_id, 0, n=2, max_new_tokens=4))
    assert worker.step() == 1 and clock.moved()


def test_learner_progresses_per_trained_step(model_dir, tmp_path):
    runs = tmp_path / "runs"
    trainer = {"total_training_steps": 2, "save_freq": 0, "runs_dir": str(runs)}
    spec = small_spec(model_dir, make_dataset(tmp_path / "d.jsonl"), runs, trainer=trainer)
    store = MemoryRunStore()
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    bus = MemoryBus(run_id)
    loop = start_learner(spec, store, bus)
    clock = Clock(loop.rt)
    loop.broadcast()  # sending weights trains nothing
    assert not clock.moved()
    publish_batch(bus, batch(run_id, 0))
    train_next(loop)
    assert clock.moved() and loop.step == 1
