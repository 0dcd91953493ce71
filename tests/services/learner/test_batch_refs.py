"""The learner over batch references, on a real Redis and on the in-memory bus: it trains what
it trained when batches carried their groups (same figures), reads the groups by id after a
trim, acknowledges a batch and its held groups together once a checkpoint holds them, and a
learner killed before its checkpoint loses nothing and leaves nothing held."""

from __future__ import annotations

import json

import pytest
import redis

from dapo.runtime.runs import MemoryRunStore
from dapo.transport.memory_bus import MemoryBus
from dapo.transport.redis_bus import RedisBus
from proto.messages import TrainingBatchRef
from services.learner.service import CONSUMER
from tests.e2e_helpers import make_dataset, metrics_lines, small_spec
from tests.services.learner.test_service import (
    batch,
    model_dir,  # noqa: F401 -- the fixture
    publish_batch,
    start_learner,
    train_next,
)

FIGURES = ("loss", "grad_norm", "reward_mean", "acc_mean", "response_length_mean")


@pytest.fixture(params=["redis", "memory"])
def new_bus(request, redis_url, run_id):
    """``new_bus(run_id)``: a client of one shared server (broker) per test; a second one is
    a restarted process."""
    buses: list[MemoryBus] = []

    def make(run: str):
        if request.param == "redis":
            return RedisBus(redis.Redis.from_url(redis_url), run)
        bus = MemoryBus(run, broker=buses[0].broker) if buses else MemoryBus(run)
        buses.append(bus)
        return bus

    return make


def new_run(model_dir, tmp_path, steps: int, save_freq: int):  # noqa: F811
    tmp_path.mkdir(parents=True, exist_ok=True)
    runs = tmp_path / "runs"
    trainer = {"total_training_steps": steps, "save_freq": save_freq, "runs_dir": str(runs)}
    spec = small_spec(model_dir, make_dataset(tmp_path / "d.jsonl"), runs, trainer=trainer)
    store = MemoryRunStore()
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    return spec, store, run_id, runs / run_id


def held_groups(bus) -> int:
    return bus.lag("scored")["sampler"].pending


def test_a_batch_by_reference_trains_the_figures_of_the_batch_itself(
    new_bus,
    model_dir,  # noqa: F811
    tmp_path,
):
    spec, store, run_id, run_dir = new_run(model_dir, tmp_path / "a", steps=2, save_freq=0)
    direct = start_learner(spec, store, MemoryBus(run_id))
    expected = [direct.policy.train_batch(batch(run_id, i)) for i in range(2)]

    spec, store, run_id, run_dir = new_run(model_dir, tmp_path / "b", steps=2, save_freq=0)
    bus = new_bus(run_id)
    for i in range(2):
        publish_batch(bus, batch(run_id, i))
    if isinstance(bus, RedisBus):
        bus.trim("scored")  # what a trim leaves: the held groups, every one
    loop = start_learner(spec, store, bus)
    loop.run()
    got = metrics_lines(run_dir)
    assert [r["batch_id"] for r in got] == [0, 1]
    for want, row in zip(expected, got, strict=True):
        assert {k: row[k] for k in FIGURES} == {k: want[k] for k in FIGURES}, row
    assert held_groups(bus) == 0 and bus.lag("batches")["learner"].pending == 0


def test_a_learner_killed_before_its_checkpoint_loses_and_repeats_nothing(
    new_bus,
    model_dir,  # noqa: F811
    tmp_path,
):
    spec, store, run_id, run_dir = new_run(model_dir, tmp_path, steps=4, save_freq=2)
    bus = new_bus(run_id)
    refs = [publish_batch(bus, batch(run_id, i)) for i in range(4)]
    assert all(refs) and held_groups(bus) == 8  # 4 batches of 2 groups, all held
    first = start_learner(spec, store, bus)
    first.broadcast()
    train_next(first)
    train_next(first)  # the checkpoint at step 2 holds batches 0 and 1: with their groups
    assert held_groups(bus) == 4 and bus.lag("batches")["learner"].pending == 0
    train_next(first)  # batch 2 trained ... and the learner is killed before step 4
    assert held_groups(bus) == 4 and bus.lag("batches")["learner"].pending == 1

    second = start_learner(spec, store, new_bus(run_id))  # a new process, same consumer
    assert second.step == 2
    second.run()  # batch 2 again (no checkpoint held it), then 3
    lines = metrics_lines(run_dir)
    assert [r["batch_id"] for r in lines] == [0, 1, 2, 2, 3]
    final = json.loads((run_dir / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert final["step"] == 4 and store.state(run_id).status == "completed"
    # every batch and every group acknowledged once a checkpoint held it; none dead
    assert held_groups(bus) == 0 and bus.lag("batches")["learner"].pending == 0
    assert bus.dead_count() == 0


def test_a_reference_whose_groups_are_gone_is_dead_lettered_saying_which(
    new_bus,
    model_dir,  # noqa: F811
    tmp_path,
):
    spec, store, run_id, _ = new_run(model_dir, tmp_path, steps=1, save_freq=0)
    bus = new_bus(run_id)
    ref = TrainingBatchRef(run_id=run_id, batch_id=0, entry_ids=["9999999-0"], group_ids=["x"])
    bus.publish("batches", ref)
    loop = start_learner(spec, store, bus)
    [d] = bus.consume("batches", "learner", CONSUMER, count=1, block_ms=10, reclaim=False)
    loop.handle(d)
    assert loop.step == 0 and bus.dead_count("batches") == 1
    assert bus.lag("batches")["learner"].pending == 0
