"""The sampler against hostile input on the real Redis bus: poison on ``versions`` (a field
name that is not UTF-8, a newer schema, another run's announcement) is skipped and counted
while the sampler goes on; a scored group of another run is dead-lettered alone; and a
dead-lettered prompt frees its in-flight slot, so the in-flight bound is not eaten away."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from dapo.data.dataset import load_default_or_files
from dapo.data.prompts import PromptSource
from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.redis_bus import RedisBus
from proto.codec import encode
from services.sampler.service import Sampler, SamplerMetrics
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.factories import scored_group, weight_version


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def sampler(model_dir, tmp_path, redis_url) -> Sampler:
    data = make_dataset(tmp_path / "d.jsonl", n=8)
    runs = tmp_path / "runs"
    spec = small_spec(
        model_dir,
        data,
        runs,
        trainer={"total_training_steps": 4, "max_in_flight": 3, "runs_dir": str(runs)},
    )
    client = redis.Redis.from_url(redis_url)
    store = RunStore(client)
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    ctx = ServiceContext("sampler", run_id, spec, "sampler-0", RedisBus(client, run_id), store)
    rows = load_default_or_files([str(data)], model_dir)
    source = PromptSource(rows, AutoTokenizer.from_pretrained(str(model_dir)), spec.data)
    return Sampler(ctx, spec, source, SamplerMetrics(CollectorRegistry()))


def test_poison_on_versions_is_skipped_and_counted_and_the_sampler_goes_on(sampler):
    bus, run_id = sampler.rt.bus, sampler.rt.run_id
    bus.publish("versions", weight_version(run_id, 1))
    bus.client.xadd(bus.key("versions"), {b"\xff\xfe": b"\x80"})  # not UTF-8
    newer = {**encode(weight_version(run_id, 9)), "v": b"2"}  # a newer learner's schema
    bus.client.xadd(bus.key("versions"), newer)
    bus.publish("versions", weight_version("another-run", 7))
    bus.publish("versions", weight_version(run_id, 2))
    for _ in range(3):  # step after step: never a crash, each poison counted once
        sampler.step()
    assert sampler.published == 2
    assert bus.dead_count("versions") == 2


def test_a_scored_group_of_another_run_is_dead_lettered_alone(sampler):
    bus, run_id = sampler.rt.bus, sampler.rt.run_id
    sampler.step()  # dispatches 3 prompts
    bus.publish("scored", scored_group("another-run", f"{run_id}-0", [True, False], 0))
    bus.publish("scored", scored_group(run_id, f"{run_id}-1", [True] * 2, 0))
    sampler.step()
    acc = sampler.account()
    assert bus.dead_count("scored") == 1 and acc["filtered_all_correct"] == 1
    assert acc["dead"] == 0  # the stranger was never dispatched here: not in the account
    assert bus.lag("scored")["sampler"].pending == 0


def test_a_dead_lettered_prompt_frees_its_in_flight_slot(sampler):
    bus = sampler.rt.bus
    sampler.step()
    acc = sampler.account()
    assert (acc["dispatched"], acc["in_flight"]) == (3, 3)  # max_in_flight reached
    sampler.step()
    assert sampler.account()["dispatched"] == 3
    (d, *_) = bus.consume("prompts", "rollout", "rollout-0", count=1, block_ms=10)
    bus.reject(d, "IndexError: the engine could not take it")
    acc = sampler.account()
    assert (acc["dead"], acc["in_flight"]) == (1, 2)
    sampler.step()  # the slot is free again: one more prompt goes out
    acc = sampler.account()
    assert (acc["dispatched"], acc["dead"], acc["in_flight"]) == (4, 1, 3)
    total = acc["trained"] + acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    assert acc["dispatched"] == total + acc["dropped_stale"] + acc["dead"] + acc["in_flight"]
