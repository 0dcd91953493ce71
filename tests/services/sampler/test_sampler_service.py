"""The sampler service against a real Redis: dispatch, stale drops, filters, exact batches,
and a restart that resumes its cursor and held groups from Redis."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from dapo.data.dataset import load_default_or_files
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ServiceSettings
from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceRuntime
from dapo.transport.redis_bus import RedisBus
from proto.messages import WeightVersion
from services.sampler.service import Sampler, SamplerMetrics
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.factories import scored_group


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def new_sampler(rt, spec, model_dir, data) -> Sampler:
    rows = load_default_or_files([str(data)], model_dir)
    source = PromptSource(rows, AutoTokenizer.from_pretrained(str(model_dir)), spec.data)
    return Sampler(rt, spec, source, SamplerMetrics(CollectorRegistry()))


def test_sampler_flow_and_restart(model_dir, tmp_path, redis_url):
    data = make_dataset(tmp_path / "d.jsonl", n=5)
    spec = small_spec(
        model_dir,
        data,
        tmp_path / "runs",
        trainer={"total_training_steps": 4, "max_in_flight": 3, "runs_dir": str(tmp_path / "runs")},
        algorithm={"filter_groups": {"metric": "acc"}},
    )
    store = RunStore(__import__("redis").Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    settings = ServiceSettings(redis_url=redis_url, run_id=run_id, worker_id="sampler-0")
    with ServiceRuntime("sampler", settings) as runtime:
        rt = runtime.ctx
        sampler = new_sampler(rt, spec, model_dir, data)
        sampler.step()
        acc = store.account(run_id)
        assert acc["dispatched"] == 3 and acc["in_flight"] == 3  # bounded by max_in_flight
        assert rt.bus.length("prompts") == 3
        # the learner trained and published versions 1 and 2; scored groups arrive
        store.update(run_id, step=2, policy_version=2)
        rt.state(max_age_s=0)  # the loop re-reads the state at most every 50 ms
        for v in (1, 2):
            rt.bus.publish(
                "versions",
                WeightVersion(run_id=run_id, version=v, step=v, checksum="c", num_bytes=0),
            )
        rt.bus.publish(
            "scored", scored_group(run_id, "s0", [True, False, True, False], 0)
        )  # 2 stale
        rt.bus.publish("scored", scored_group(run_id, "s1", [True] * 4, 2))
        rt.bus.publish("scored", scored_group(run_id, "s2", [False] * 4, 2))
        rt.bus.publish("scored", scored_group(run_id, "s3", [True, False, False, False], 1))
        sampler.step()
        acc = store.account(run_id)
        assert (acc["dropped_stale"], acc["filtered_all_correct"], acc["filtered_all_wrong"]) == (
            1,
            1,
            1,
        )
        assert acc["batches"] == 0 and len(sampler._assembler.held) == 1
        # a restart: a fresh sampler gets its held group back from the stream, not twice counted
        rt.bus = RedisBus(runtime.client, run_id)  # a new process has a new bus client
        restarted = new_sampler(rt, spec, model_dir, data)
        restarted.refresh_versions()
        restarted.absorb(
            rt.bus.consume("scored", "sampler", "sampler-0", count=10, block_ms=10, reclaim=False),
            restarted.train_version(0),
        )
        assert len(restarted._assembler.held) == 1
        rt.bus.publish("scored", scored_group(run_id, "s4", [False, True, False, True], 2))
        restarted.step()
        acc = store.account(run_id)
        assert acc["batches"] == 1 and acc["trained"] == 2
        batch = runtime.client.xrange(rt.bus.key("batches"))
        assert len(batch) == 1 and b'"s3"' in batch[0][1][b"h"] and b'"s4"' in batch[0][1][b"h"]
        # the cursor continued where the first sampler stopped: new group ids, no repeats
        ids = [f[b"h"] for _, f in runtime.client.xrange(rt.bus.key("prompts"))]
        assert len(ids) == len(set(ids)) == acc["dispatched"]
