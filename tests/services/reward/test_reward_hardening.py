"""The reward loop on the real Redis bus against hostile groups: a slow group is kept alive
and never taken over and scored again by a second worker, and a group that cannot be
scored is dead-lettered alone while the rest of its read is published."""

from __future__ import annotations

import threading
import time

import redis

from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.bus import BusSettings
from dapo.transport.redis_bus import RedisBus
from proto.runspec import RunSpec
from services.reward.service import RewardWorker
from tests.factories import rollout_group

SPEC = RunSpec.model_validate(
    {
        "data": {"train_batch_size": 2, "max_response_length": 12},
        "actor": {"ppo_mini_batch_size": 2},
        "rollout": {"n": 2},
        "reward": {"overlong_buffer": {"enable": True, "len": 4, "penalty_factor": 1.0}},
    }
)
EOS = 256


def ids(text: str) -> list[int]:
    return [*text.encode(), EOS]


def redis_context(redis_url: str, worker_id: str, run_id: str | None = None, **bus):
    """A reward worker's context over the real bus (``bus``: ``BusSettings`` fields)."""
    client = redis.Redis.from_url(redis_url)
    store = RunStore(client)
    if run_id is None:
        run_id = store.create(SPEC).run_id
        store.set_status(run_id, "running")
    rbus = RedisBus(client, run_id, BusSettings(**bus))
    return ServiceContext("reward", run_id, SPEC, worker_id, rbus, store)


class SlowTokenizer:
    """The byte tokenizer, taking ``delay_s`` per group: a group whose every sample runs to
    the verifier's timeout looks like this to the loop."""

    def __init__(self, tokenizer, delay_s: float) -> None:
        self.tokenizer, self.delay_s, self.calls = tokenizer, delay_s, 0

    def batch_decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def test_a_slow_group_is_not_taken_over_and_scored_twice(redis_url, byte_tokenizer):
    bus = {"claim_idle_ms": 300, "claim_interval_s": 0.0}
    slow_ctx = redis_context(redis_url, "reward-0", **bus)
    fast_ctx = redis_context(redis_url, "reward-1", run_id=slow_ctx.run_id, **bus)
    slow_ctx.bus.publish("rollouts", rollout_group(slow_ctx.run_id, "a", [ids("Answer: 2")] * 2))
    slow = RewardWorker(slow_ctx, SlowTokenizer(byte_tokenizer, 1.5), touch_every_s=0.05)
    fast_tokenizer = SlowTokenizer(byte_tokenizer, 0.0)
    fast = RewardWorker(fast_ctx, fast_tokenizer)
    done = []
    worker = threading.Thread(target=lambda: done.append(slow.step()))
    worker.start()
    while not slow_ctx.bus.lag("rollouts").get("reward", None) or not slow.tokenizer.calls:
        time.sleep(0.01)  # the slow worker holds the group now
    while worker.is_alive():  # the other worker keeps looking for idle entries meanwhile
        assert fast.step() == 0
    worker.join()
    assert done == [1] and fast_tokenizer.calls == 0
    scored = slow_ctx.bus.read("scored")[1]
    assert [g.group_id for g in scored] == ["a"]
    assert slow_ctx.bus.lag("rollouts")["reward"].pending == 0


def test_a_group_that_cannot_be_scored_is_dead_lettered_alone(redis_url, byte_tokenizer):
    ctx = redis_context(redis_url, "reward-0")
    ctx.bus.publish("rollouts", rollout_group(ctx.run_id, "a", [ids("Answer: 2")] * 2))
    # a token id no tokenizer can decode: well-formed on the wire, hostile to the scorer
    poison = rollout_group(ctx.run_id, "b", [[-1, 65], ids("Answer: 2")])
    ctx.bus.publish("rollouts", poison)
    ctx.bus.publish("rollouts", rollout_group(ctx.run_id, "c", [ids("Answer: 3")] * 2))
    assert RewardWorker(ctx, byte_tokenizer).step() == 2
    assert [g.group_id for g in ctx.bus.read("scored")[1]] == ["a", "c"]
    assert ctx.bus.dead_count("rollouts") == 1
    ((_, record),) = ctx.bus.client.xrange(ctx.bus.dead_key)
    assert b"OverflowError" in record[b"reason"]
    assert ctx.bus.lag("rollouts")["reward"].pending == 0
