"""The ``Bus`` contract, held by both implementations: ``RedisBus`` on a real private
redis-server and ``MemoryBus``. A new bus over the same server (broker) is a restarted
process."""

from __future__ import annotations

import time

import pytest
import redis

from dapo.transport.bus import BusSettings
from dapo.transport.memory_bus import MemoryBroker, MemoryBus
from dapo.transport.redis_bus import RedisBus
from proto.codec import encode
from tests.factories import prompt_task, weight_version


@pytest.fixture(params=["redis", "memory"])
def new_bus(request, redis_url, run_id):
    """``new_bus(**settings)``: a client of one shared server per test."""
    broker = MemoryBroker()

    def make(**kw):
        if request.param == "redis":
            return RedisBus(redis.Redis.from_url(redis_url), run_id, BusSettings(**kw))
        return MemoryBus(run_id, BusSettings(**kw), broker=broker)

    return make


def append_raw(bus, stream: str, fields: dict) -> None:
    """What a foreign or broken writer could put on a stream."""
    if isinstance(bus, RedisBus):
        bus.client.xadd(bus.key(stream), fields)
    else:
        bus.append(stream, fields)


def test_publish_consume_ack_and_lag(new_bus, run_id):
    bus = new_bus()
    for i in range(5):
        assert bus.publish("prompts", prompt_task(run_id, i)) is not None
    got = bus.consume("prompts", "rollout", "w0", count=3, block_ms=10)
    assert [d.message.group_id for d in got] == ["g0", "g1", "g2"]
    assert (bus.lag("prompts")["rollout"].pending, bus.lag("prompts")["rollout"].lag) == (3, 2)
    bus.ack_many(got)
    rest = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)
    assert [d.message.group_id for d in rest] == ["g3", "g4"]
    bus.ack(rest[0])
    assert bus.lag("prompts")["rollout"].pending == 1


def test_commit_is_once_per_dedupe_key_with_its_counters(new_bus, run_id):
    bus = new_bus()
    for i in range(3):
        bus.publish("prompts", prompt_task(run_id, i))
    got = bus.consume("prompts", "sampler", "s0", count=3, block_ms=10)
    commit = dict(stream="versions", msg=weight_version(run_id, 1), dedupe_key="b1")
    assert bus.commit(**commit, ack=got, counters={"trained": 3}, counter="account")
    assert bus.commit(**commit, ack=got, counters={"trained": 3}, counter="account") is None
    assert bus.length("versions") == 1 and bus.counters("account") == {"trained": 3}
    assert bus.lag("prompts")["sampler"].pending == 0
    ids = bus.publish_many("rollouts", [], [])
    assert ids == []


def test_poison_entries_are_dead_lettered_alone(new_bus, run_id):
    bus = new_bus()
    bus.publish("prompts", prompt_task(run_id, 1))
    append_raw(bus, "prompts", {"v": "1", "k": "prompt_task", "h": "{not json", "b": b""})
    append_raw(bus, "prompts", {"v": "99", "k": "prompt_task", "h": "{}", "b": b""})
    append_raw(bus, "prompts", {b"\xff\xfe": b"x"})  # a field name that is not UTF-8
    bus.publish("prompts", prompt_task(run_id, 2))
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)
    assert [d.message.group_id for d in got] == ["g1", "g2"]  # the healthy ones, same read
    assert bus.dead_count("prompts") == 3 and bus.lag("prompts")["rollout"].pending == 2


def test_an_entry_failing_max_deliveries_is_dead_lettered(new_bus, run_id):
    bus = new_bus(max_deliveries=2, claim_interval_s=0.0)
    bus.publish("prompts", prompt_task(run_id, 1))
    for _ in range(2):
        (d,) = bus.consume("prompts", "rollout", "w0", count=4, block_ms=10)
        bus.nack(d, "engine exploded")
    assert bus.consume("prompts", "rollout", "w0", count=4, block_ms=10) == []
    assert bus.dead_count("prompts") == 1 and bus.lag("prompts")["rollout"].pending == 0


def test_held_entries_are_handed_out_once_and_again_after_a_restart(new_bus, run_id):
    # the learner holds batches unacknowledged until a checkpoint holds them
    bus = new_bus()
    for i in range(3):
        bus.publish("prompts", prompt_task(run_id, i))
    seen = []
    for _ in range(5):
        seen += [d.message.group_id for d in bus.consume("prompts", "learner", "l0", count=1,
                                                           block_ms=10, reclaim=False)]  # fmt: skip
    assert seen == ["g0", "g1", "g2"]
    restarted = new_bus()  # a new process under the same consumer name
    again = [d.message.group_id for d in restarted.consume("prompts", "learner", "l0", count=2,
                                                           block_ms=10, reclaim=False)]  # fmt: skip
    again += [d.message.group_id for d in restarted.consume("prompts", "learner", "l0", count=2,
                                                            block_ms=10, reclaim=False)]  # fmt: skip
    assert again == ["g0", "g1", "g2"]


def test_a_dead_consumers_entries_are_reclaimed(new_bus, run_id):
    bus = new_bus(claim_idle_ms=100, claim_interval_s=0.0)
    bus.publish("prompts", prompt_task(run_id, 7))
    assert len(bus.consume("prompts", "rollout", "dead", count=4, block_ms=10)) == 1
    assert bus.consume("prompts", "rollout", "alive", count=4, block_ms=10) == []
    time.sleep(0.15)
    (d,) = bus.consume("prompts", "rollout", "alive", count=4, block_ms=10)
    assert d.message.group_id == "g7" and d.deliveries == 2


def test_broadcast_read_skips_and_counts_a_poison_entry(new_bus, run_id):
    bus = new_bus()
    bus.publish("versions", weight_version(run_id, 1))
    append_raw(bus, "versions", {**encode(weight_version(run_id, 2)), "v": b"2"})  # newer schema
    bus.publish("versions", weight_version(run_id, 3))
    cursor, got = bus.read("versions")
    assert [m.version for m in got] == [1, 3] and bus.dead_count("versions") == 1
    assert bus.read("versions", cursor) == (cursor, [])
    bus.publish("versions", weight_version(run_id, 4))
    assert [m.version for m in bus.read("versions", cursor)[1]] == [4]


def test_dead_letters_keep_a_bounded_copy_of_what_came(new_bus, run_id):
    bus = new_bus()
    append_raw(bus, "prompts", {"v": "1", "k": "prompt_task", "h": "{}", "b": b"x" * (1 << 20)})
    assert bus.consume("prompts", "rollout", "w0", count=4, block_ms=10) == []
    if isinstance(bus, RedisBus):
        ((_, record),) = bus.client.xrange(bus.dead_key)
        record = {k.decode(): v for k, v in record.items()}
    else:
        (record,) = bus.dead
    assert len(record["orig.b"]) == 64 << 10 and int(record["size.b"]) == 1 << 20
    assert record["orig.k"] in (b"prompt_task", "prompt_task")
