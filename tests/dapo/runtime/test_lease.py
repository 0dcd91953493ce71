"""One holder per lease, and the fence: a holder that lost its lease writes nothing more."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from dapo.runtime.lease import Lease
from dapo.runtime.runs import RunStore
from dapo.transport.bus import FencedOut
from dapo.transport.redis_bus import RedisBus
from proto.runspec import RunSpec
from tests.factories import prompt_task, weight_version


@pytest.fixture
def client(redis_url):
    return redis.Redis.from_url(redis_url)


def test_a_second_candidate_waits_until_the_lease_is_free(client, run_id):
    first = Lease(client, f"lease:{run_id}", "learner-a", ttl_s=5)
    first.acquire(stop=lambda: False)
    second = Lease(client, f"lease:{run_id}", "learner-b", ttl_s=5)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(lambda: False, 0.05), got.set()))
    waiter.start()
    assert not got.wait(0.5)  # held: the second one waits
    first.release()
    assert got.wait(5)
    waiter.join()
    assert client.get(f"lease:{run_id}") == second.value and second.value != first.value
    second.release()


def test_a_stalled_holder_is_fenced_out_of_every_write(client, run_id):
    key = f"lease:{run_id}"
    stalled = Lease(client, key, "learner-a", ttl_s=0.3)
    fence = stalled.acquire(stop=lambda: False)
    stalled._stop.set()  # it stops renewing: a long pause, a partition
    bus = RedisBus(client, run_id, fence=fence)
    store = RunStore(client, fence=fence)
    rid = store.create(RunSpec(name="fenced")).run_id
    bus.publish("prompts", prompt_task(run_id, 1))
    (d,) = bus.consume("prompts", "learner", "l0", count=1, block_ms=10)
    bus.publish("versions", weight_version(run_id, 1))  # still ours: it goes through
    store.update(rid, step=1)
    time.sleep(0.5)  # the lease expires ...
    successor = Lease(client, key, "learner-b", ttl_s=5)
    successor.acquire(stop=lambda: False)  # ... and another learner takes it
    with pytest.raises(FencedOut):
        bus.publish("versions", weight_version(run_id, 2))
    with pytest.raises(FencedOut):
        bus.ack(d)
    with pytest.raises(FencedOut):
        store.update(rid, step=2)
    assert bus.length("versions") == 1 and bus.lag("prompts")["learner"].pending == 1
    assert RunStore(client).state(rid).step == 1
    successor.release()


def test_the_renewal_notices_a_lost_lease(client, run_id):
    key = f"lease:{run_id}"
    lease = Lease(client, key, "learner-a", ttl_s=0.3)
    lease.acquire(stop=lambda: False)
    client.set(key, b"99:someone-else")  # taken over behind its back
    assert lease.lost.wait(2)
