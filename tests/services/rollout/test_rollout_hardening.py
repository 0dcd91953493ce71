"""The rollout loop on the real Redis bus with the real Hugging Face engine, fed a hostile
task: the generation is done again task by task, the task that fails alone is
dead-lettered (and, being a prompt the sampler dispatched, resolved in the account as
dead), and the other tasks of the read become groups."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from transformers import AutoTokenizer

from dapo.engines.hf import HFEngine
from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.bus import ACCOUNT
from dapo.transport.redis_bus import RedisBus
from proto.runspec import RunSpec
from services.rollout.service import RolloutWorker
from tests.e2e_helpers import make_model_dir
from tests.factories import prompt_task

SPEC = RunSpec.model_validate(
    {
        "data": {"train_batch_size": 2, "max_response_length": 6},
        "rollout": {"n": 2},
        "actor": {"ppo_mini_batch_size": 2},
        "reward": {"overlong_buffer": {"enable": False}},
    }
)


class NoUpdates:
    def poll(self, timeout_s: float = 0.0) -> int | None:
        return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("model"))
    return HFEngine(str(path), AutoTokenizer.from_pretrained(str(path)), device="cpu")


def test_a_task_the_engine_cannot_run_is_dead_lettered_alone(redis_url, engine):
    client = redis.Redis.from_url(redis_url)
    store = RunStore(client)
    run_id = store.create(SPEC).run_id
    store.set_status(run_id, "running")
    ctx = ServiceContext("rollout", run_id, SPEC, "rollout-0", RedisBus(client, run_id), store)
    ctx.bus.commit(counters={"dispatched": 3}, counter=ACCOUNT)  # what the sampler sent
    tasks = [
        prompt_task(run_id, i, n=2, max_new_tokens=4).model_copy(
            update={"group_id": f"{run_id}-{i}"}
        )
        for i in range(3)
    ]
    # token ids far beyond the vocabulary: well-formed on the wire, fatal to the embedding
    tasks[1] = tasks[1].model_copy(update={"prompt_ids": np.array([1, 10**6], dtype=np.int32)})
    for t in tasks:
        ctx.bus.publish("prompts", t)
    worker = RolloutWorker(ctx, engine, NoUpdates(), "hf", max_prompts=3)
    assert worker.step() == 2
    groups = ctx.bus.read("rollouts")[1]
    assert [g.group_id for g in groups] == [f"{run_id}-0", f"{run_id}-2"]
    assert ctx.bus.dead_count("prompts") == 1
    assert ctx.bus.lag("prompts")["rollout"].pending == 0
    account = store.account(run_id)
    assert (account["dead"], account["in_flight"]) == (1, 2)
