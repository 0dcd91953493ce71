"""The bus against a real private redis-server: delivery, reclaim, dead letters, trimming."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import redis

from dapo.transport.bus import BusSettings
from dapo.transport.redis_bus import RedisBus
from proto.codec import encode
from tests.factories import prompt_task, weight_version


def make_bus(url: str, run_id: str, **kw) -> RedisBus:
    return RedisBus(redis.Redis.from_url(url), run_id, BusSettings(**kw))


def test_publish_consume_ack(redis_url, run_id):
    bus = make_bus(redis_url, run_id)
    for i in range(5):
        assert bus.publish("prompts", prompt_task(run_id, i)) is not None
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=100)
    assert [d.message.group_id for d in got] == [f"g{i}" for i in range(5)]
    assert bus.lag("prompts")["rollout"].pending == 5
    for d in got:
        bus.ack(d)
    assert bus.lag("prompts")["rollout"].pending == 0
    assert bus.consume("prompts", "rollout", "w0", block_ms=50) == []


def test_dedupe_key_makes_republishing_harmless(redis_url, run_id):
    bus = make_bus(redis_url, run_id)
    assert bus.publish("prompts", prompt_task(run_id, 1), dedupe_key="g1") is not None
    assert bus.publish("prompts", prompt_task(run_id, 1), dedupe_key="g1") is None
    assert bus.length("prompts") == 1


CRASHING_CONSUMER = textwrap.dedent("""
    import os, sys, redis
    from dapo.transport.redis_bus import RedisBus
    from proto.messages import WeightVersion
    url, run_id, publish_first = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    bus = RedisBus(redis.Redis.from_url(url), run_id)
    got = bus.consume("prompts", "rollout", "doomed", count=1, block_ms=2000)
    assert len(got) == 1
    gid = got[0].message.group_id
    if publish_first:  # result made durable downstream, then death before the ack
        out = WeightVersion(run_id=run_id, version=1, step=1, checksum=gid, num_bytes=0)
        bus.publish("versions", out, dedupe_key=gid)
    os._exit(3)  # dies without acknowledging
""")


def _crash_consumer(url: str, run_id: str, publish_first: bool) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_CONSUMER, url, run_id, "1" if publish_first else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr


def _survivor_processes(bus: RedisBus, run_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = bus.consume("prompts", "rollout", "survivor", count=4, block_ms=100)
        for d in got:
            out = weight_version(run_id, 1).model_copy(update={"checksum": d.message.group_id})
            bus.commit(stream="versions", msg=out, dedupe_key=d.message.group_id, ack=[d])
        if not got and bus.lag("prompts")["rollout"].pending == 0:
            return
    raise AssertionError("survivor never drained the crashed consumer's entry")


def test_crashed_consumer_entry_is_reclaimed_exactly_once(redis_url, run_id):
    bus = make_bus(redis_url, run_id, claim_idle_ms=200, claim_interval_s=0.0)
    bus.publish("prompts", prompt_task(run_id, 7))
    _crash_consumer(redis_url, run_id, publish_first=False)
    assert bus.lag("prompts")["rollout"].pending == 1
    time.sleep(0.3)
    _survivor_processes(bus, run_id)
    out = bus.client.xrange(bus.key("versions"))
    assert [f[b"h"].count(b'"g7"') for _, f in out] == [1]


def test_crash_after_downstream_publish_does_not_duplicate(redis_url, run_id):
    bus = make_bus(redis_url, run_id, claim_idle_ms=200, claim_interval_s=0.0)
    bus.publish("prompts", prompt_task(run_id, 8))
    _crash_consumer(redis_url, run_id, publish_first=True)
    time.sleep(0.3)
    _survivor_processes(bus, run_id)
    assert bus.length("versions") == 1  # the redelivery's publish was deduplicated
    assert bus.lag("prompts")["rollout"].pending == 0


def test_poison_messages_go_to_dead_letters_and_consumer_keeps_going(redis_url, run_id):
    bus = make_bus(redis_url, run_id)
    key = bus.key("prompts")
    bus.client.xadd(key, {"garbage": "yes"})
    future = encode(prompt_task(run_id, 1))
    future["v"] = b"2"
    bus.client.xadd(key, future)
    wrong_shape = encode(prompt_task(run_id, 2))
    wrong_shape["h"] = wrong_shape["h"].replace(b'"n":4', b'"n":1')
    bus.client.xadd(key, wrong_shape)
    bus.publish("prompts", prompt_task(run_id, 3))
    got = bus.consume("prompts", "rollout", "w0", count=10, block_ms=100)
    assert [d.message.group_id for d in got] == ["g3"]
    dead = bus.client.xrange(bus.dead_key)
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert len(reasons) == 3
    assert "no 'v' field" in reasons[0]
    assert "schema version 2 is not supported" in reasons[1]
    assert "n" in reasons[2] and "invalid prompt_task" in reasons[2]
    assert dead[1][1][b"orig.v"] == b"2"  # original fields kept: nothing lost
    assert bus.dead_count("prompts") == 3
    assert bus.lag("prompts")["rollout"].pending == 1  # only the good one awaits its ack


def test_message_failing_n_deliveries_is_dead_lettered(redis_url, run_id):
    bus = make_bus(redis_url, run_id, max_deliveries=3)
    bus.publish("prompts", prompt_task(run_id, 1))
    seen = 0
    for _ in range(6):
        for d in bus.consume("prompts", "rollout", "w0", count=1, block_ms=50):
            seen += 1
            bus.nack(d, "engine exploded")
    assert seen == 3
    ((_, fields),) = bus.client.xrange(bus.dead_key)
    assert b"delivered 4 times" in fields[b"reason"] and b"engine exploded" in fields[b"reason"]
    assert bus.lag("prompts")["rollout"].pending == 0


def test_trimming_keeps_stream_bounded_but_never_drops_unacked(redis_url, run_id):
    bus = make_bus(redis_url, run_id, trim_every=16)
    bus.ensure_group("prompts", "rollout")
    for i in range(400):
        bus.publish("prompts", prompt_task(run_id, i))
        for d in bus.consume("prompts", "rollout", "w0", count=4, block_ms=10):
            bus.ack(d)
    assert bus.length("prompts") <= 32
    # a lagging group keeps what it has not acknowledged
    bus.ensure_group("prompts", "slow")
    stuck = bus.consume("prompts", "slow", "s0", count=1, block_ms=10)
    for i in range(100):
        bus.publish("prompts", prompt_task(run_id, 1000 + i))
    bus.trim("prompts")
    ids = [e[0].decode() for e in bus.client.xrange(bus.key("prompts"))]
    assert stuck[0].entry_id in ids


class AckBeforePending(redis.Redis):
    """A client in whose XPENDING call another consumer acknowledges everything first: the
    check-then-act window of ``trim`` (XINFO says pending, XPENDING finds none) made certain."""

    def xpending(self, name, groupname):
        other = redis.Redis(connection_pool=self.connection_pool)
        ids = [r["message_id"] for r in other.xpending_range(name, groupname, "-", "+", 1000)]
        if ids:
            other.xack(name, groupname, *ids)
        return super().xpending(name, groupname)


def test_trim_survives_entries_acked_between_its_reads(redis_url, run_id):
    bus = RedisBus(AckBeforePending.from_url(redis_url), run_id, BusSettings())
    for i in range(6):
        bus.publish("prompts", prompt_task(run_id, i))
    got = bus.consume("prompts", "rollout", "w0", count=4, block_ms=10)
    assert bus.lag("prompts")["rollout"].pending == 4
    assert bus.trim("prompts") >= 0  # raised ValueError ('None' is not an int) before
    left = [e[0].decode() for e in bus.client.xrange(bus.key("prompts"))]
    assert len(left) >= 2 and got[-1].entry_id < left[-2]  # the undelivered two stay
    assert len(bus.consume("prompts", "rollout", "w0", count=4, block_ms=10)) == 2


def test_two_runs_are_isolated(redis_url):
    a, b = make_bus(redis_url, "run-a"), make_bus(redis_url, "run-b")
    a.publish("prompts", prompt_task("run-a", 1))
    assert b.consume("prompts", "rollout", "w0", block_ms=50) == []
    assert len(a.consume("prompts", "rollout", "w0", block_ms=50)) == 1
    assert a.key("prompts") != b.key("prompts")


def test_lag_counts_undelivered_entries(redis_url, run_id):
    bus = make_bus(redis_url, run_id)
    bus.ensure_group("prompts", "rollout")
    for i in range(7):
        bus.publish("prompts", prompt_task(run_id, i))
    bus.consume("prompts", "rollout", "w0", count=3, block_ms=10)
    lag = bus.lag("prompts")["rollout"]
    assert (lag.pending, lag.lag) == (3, 4)


def test_commit_acks_many_and_counts_once_per_dedupe_key(redis_url, run_id):
    bus = make_bus(redis_url, run_id)
    for i in range(3):
        bus.publish("prompts", prompt_task(run_id, i))
    got = bus.consume("prompts", "sampler", "s0", count=3, block_ms=50)
    out = weight_version(run_id, 1)
    assert (
        bus.commit(
            stream="versions",
            msg=out,
            dedupe_key="b1",
            ack=got,
            counters={"trained": 3},
            counter="account",
        )
        is not None
    )
    assert bus.lag("prompts")["sampler"].pending == 0
    # the same commit replayed (a redelivery) publishes and counts nothing
    assert (
        bus.commit(
            stream="versions",
            msg=out,
            dedupe_key="b1",
            ack=got,
            counters={"trained": 3},
            counter="account",
        )
        is None
    )
    assert bus.length("versions") == 1
    assert bus.counters("account")["trained"] == 3
    # counters without a message
    bus.commit(counters={"filtered": 2}, counter="account")
    assert bus.counters("account")["filtered"] == 2
