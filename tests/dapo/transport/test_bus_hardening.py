"""Hostile entries and slow consumers, on both buses (``RedisBus`` on a real private
redis-server and ``MemoryBus``): a message is rejected alone, a dead-lettered prompt of the
run frees its in-flight slot once, a consumer that works long keeps its entries, and no entry
is dead-lettered twice."""

from __future__ import annotations

import time

import pytest
import redis

from dapo.transport.bus import ACCOUNT, BusSettings, FencedOut, GroupLag, handle_each
from dapo.transport.memory_bus import MemoryBroker, MemoryBus
from dapo.transport.redis_bus import RedisBus
from proto.codec import encode
from proto.messages import TrainingBatchRef
from proto.state import account_from_counters
from tests.factories import prompt_task, weight_version


@pytest.fixture(params=["redis", "memory"])
def new_bus(request, redis_url, run_id):
    """``new_bus(**settings)``: a client of one shared server (broker) per test."""
    broker = MemoryBroker()

    def make(**kw):
        if request.param == "redis":
            return RedisBus(redis.Redis.from_url(redis_url), run_id, BusSettings(**kw))
        return MemoryBus(run_id, BusSettings(**kw), broker=broker)

    return make


def count_dispatched(bus, n: int) -> None:
    """What the sampler's dispatch adds to the account."""
    bus.commit(counters={"dispatched": n}, counter=ACCOUNT)


def dispatched(run_id: str, seq: int):
    """A prompt task as the sampler dispatches it: group id ``<run>-<seq>``."""
    return prompt_task(run_id, seq).model_copy(update={"group_id": f"{run_id}-{seq}"})


def append_raw(bus, stream: str, fields: dict) -> None:
    if isinstance(bus, RedisBus):
        bus.client.xadd(bus.key(stream), fields)
    else:
        bus.append(stream, fields)


def dead_records(bus) -> list[dict]:
    if isinstance(bus, RedisBus):
        return [{k.decode(): v for k, v in r.items()} for _, r in bus.client.xrange(bus.dead_key)]
    return list(bus.dead)


def test_a_message_whose_handling_fails_is_rejected_alone(new_bus, run_id):
    bus = new_bus()
    count_dispatched(bus, 4)
    for seq in range(4):
        bus.publish("prompts", dispatched(run_id, seq))
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)
    done = []

    def handle(d):
        if d.message.group_id.endswith("-2"):
            raise IndexError("token id 151936 out of range")
        done.append(d.message.group_id)
        bus.ack(d)

    assert handle_each(bus, got, handle) == 1
    assert done == [f"{run_id}-{i}" for i in (0, 1, 3)]  # the others of the read went on
    assert bus.lag("prompts")["rollout"].pending == 0 and bus.dead_count("prompts") == 1
    (record,) = dead_records(bus)
    assert "IndexError: token id 151936" in str(record["reason"])
    assert record["stream"] in ("prompts", b"prompts")
    # the prompt is resolved in the account: its in-flight slot is free again
    assert bus.counters(ACCOUNT) == {"dispatched": 4, "dead": 1}


def test_infrastructure_errors_are_not_blamed_on_the_message(new_bus, run_id):
    bus = new_bus()
    bus.publish("prompts", dispatched(run_id, 0))
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)

    def handle(d):
        raise redis.ConnectionError("Redis went away")

    with pytest.raises(redis.ConnectionError):
        handle_each(bus, got, handle)
    assert bus.dead_count() == 0 and bus.lag("prompts")["rollout"].pending == 1


def test_only_the_runs_own_prompts_count_in_the_account_and_once(new_bus, run_id):
    bus = new_bus(max_deliveries=1, claim_interval_s=0.0)
    count_dispatched(bus, 6)
    bus.publish("prompts", dispatched(run_id, 5))
    bus.publish("prompts", prompt_task(run_id, 6))  # a well-formed stranger: not dispatched
    bus.publish("prompts", dispatched("other-run", 7))  # another run's prompt
    bus.publish("prompts", dispatched(run_id, 6))  # beyond what the sampler dispatched
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)
    for d in got:
        bus.reject(d, "hostile")
    assert bus.dead_count("prompts") == 4 and bus.counters(ACCOUNT)["dead"] == 1
    # the same prompt dead-lettered again (say its task was sent twice): counted once
    bus.publish("prompts", dispatched(run_id, 5))
    (again,) = bus.consume("prompts", "rollout", "w0", count=10, block_ms=10)
    bus.reject(again, "hostile")
    assert bus.dead_count("prompts") == 5 and bus.counters(ACCOUNT)["dead"] == 1


def test_an_entry_over_its_deliveries_counts_as_a_dead_prompt(new_bus, run_id):
    bus = new_bus(max_deliveries=1, claim_interval_s=0.0)
    count_dispatched(bus, 4)
    bus.publish("prompts", dispatched(run_id, 3))
    (d,) = bus.consume("prompts", "rollout", "w0", count=4, block_ms=10)
    bus.nack(d, "the engine crashed on it")
    assert bus.consume("prompts", "rollout", "w0", count=4, block_ms=10) == []
    acc = account_from_counters(bus.counters(ACCOUNT))
    assert (acc["dead"], acc["in_flight"]) == (1, 3)
    assert "the engine crashed on it" in str(dead_records(bus)[0]["reason"])


def test_a_rejected_entry_another_consumer_already_took_is_not_dead_lettered_twice(new_bus, run_id):
    bus = new_bus()
    count_dispatched(bus, 1)
    bus.publish("prompts", dispatched(run_id, 0))
    (d,) = bus.consume("prompts", "rollout", "w0", count=4, block_ms=10)
    bus.reject(d, "first")
    bus.reject(d, "second")  # a second consumer that had reclaimed it, say
    assert bus.dead_count("prompts") == 1 and len(dead_records(bus)) == 1
    assert bus.counters(ACCOUNT)["dead"] == 1


def test_non_utf8_field_names_are_dead_lettered_on_every_path(new_bus, run_id):
    bus = new_bus()
    append_raw(bus, "prompts", {b"\xff\xfe": b"x", b"v\x80": b"\x81"})
    append_raw(bus, "versions", {b"\xc3\x28": b"1"})
    bus.publish("versions", weight_version(run_id, 1))
    assert bus.consume("prompts", "rollout", "w0", count=4, block_ms=10) == []
    cursor, versions = bus.read("versions")
    assert [v.version for v in versions] == [1]
    assert bus.dead_count("prompts") == 1 and bus.dead_count("versions") == 1
    keys = {k for r in dead_records(bus) for k in r if str(k).startswith("orig.")}
    assert "orig.\\xff\\xfe" in keys and "orig.\\xc3(" in keys
    assert bus.counters(ACCOUNT) == {}


def test_touched_entries_are_not_taken_over_while_their_consumer_works(new_bus, run_id):
    bus = new_bus(claim_idle_ms=200, claim_interval_s=0.0)
    other = new_bus(claim_idle_ms=200, claim_interval_s=0.0)
    for seq in range(2):
        bus.publish("rollouts", dispatched(run_id, seq), dedupe_key=str(seq))
    # a prompt task on the rollouts stream is fine for the bus: expected type given
    kw = dict(count=4, block_ms=10, expected=type(dispatched(run_id, 0)))
    slow = bus.consume("rollouts", "reward", "slow", **kw)
    assert len(slow) == 2
    for _ in range(4):  # the slow consumer works for 4 x 100 ms, touching as it goes
        time.sleep(0.1)
        bus.touch(slow)
        assert other.consume("rollouts", "reward", "fast", **kw) == []
    time.sleep(0.3)  # it stopped touching (it died): now the entries are taken over
    taken = other.consume("rollouts", "reward", "fast", **kw)
    assert sorted(d.entry_id for d in taken) == sorted(d.entry_id for d in slow)
    bus.touch(slow)  # a late touch by the first owner does not steal them back
    assert len(other.consume("rollouts", "reward", "fast2", **kw)) == 0
    if isinstance(bus, RedisBus):
        rows = bus.client.xpending_range(bus.key("rollouts"), "reward", "-", "+", 10)
        assert {r["consumer"].decode() for r in rows} == {"fast"}


def test_broadcast_poison_of_a_newer_schema_is_skipped_once_per_read(new_bus, run_id):
    bus = new_bus()
    append_raw(bus, "versions", {**encode(weight_version(run_id, 2)), "v": b"9"})
    cursor, got = bus.read("versions")
    assert got == [] and bus.dead_count("versions") == 1
    assert bus.read("versions", cursor) == (cursor, []) and bus.dead_count("versions") == 1


def test_a_fenced_consumer_reads_nothing_once_its_lease_has_moved_on(redis_url, run_id):
    client = redis.Redis.from_url(redis_url)
    lease = f"dapo:{{{run_id}}}:learner:lease"
    client.set(lease, b"1:learner-0@old")
    old = RedisBus(client, run_id, fence=(lease, b"1:learner-0@old"))
    for seq in range(3):
        ref = TrainingBatchRef(run_id=run_id, batch_id=seq, entry_ids=["1-0"], group_ids=["g"])
        old.publish("batches", ref)
    (first,) = old.consume("batches", "learner", "learner-0", count=1, block_ms=10, reclaim=False)
    assert first.message.batch_id == 0
    client.set(lease, b"2:learner-0@new")  # a successor took the lease
    with pytest.raises(FencedOut):
        old.consume("batches", "learner", "learner-0", count=1, block_ms=200, reclaim=False)
    # nothing more went into the pending list the successor (same consumer name) re-reads
    assert old.lag("batches")["learner"] == GroupLag(pending=1, lag=2)
    new = RedisBus(client, run_id, fence=(lease, b"2:learner-0@new"))
    got = [new.consume("batches", "learner", "learner-0", count=1, block_ms=10, reclaim=False)
           for _ in range(3)]  # fmt: skip
    assert [d.message.batch_id for batch in got for d in batch] == [0, 1, 2]
    # a blocking read of a fenced client waits out its block when nothing comes
    assert new.consume("batches", "learner", "learner-0", count=1, block_ms=100) == []
