"""The run store in Redis and in memory: one lifecycle, the index of active runs."""

from __future__ import annotations

import pytest
import redis

from dapo.runtime.runs import InvalidTransition, MemoryRunStore, RunStore
from proto.keys import ACTIVE_RUNS
from proto.runspec import RunSpec


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_server):
    if request.param == "memory":
        return MemoryRunStore()
    client = redis.Redis.from_url(redis_server.rsplit("/", 1)[0] + "/14")  # its own database
    client.flushdb()
    return RunStore(client)


def test_lifecycle_moves_and_endings(store):
    spec = RunSpec(name="lc")
    rid = store.create(spec).run_id
    assert store.act(rid, "start").status == "running"
    assert store.act(rid, "start").status == "running"  # already there: a no-op
    assert store.act(rid, "pause").status == "paused"
    assert store.finish(rid, "stopped").status == "paused"  # only a stopping run stops
    store.act(rid, "resume")
    done = store.finish(rid, "completed", final_checkpoint="/c/step_1")
    assert (done.status, done.final_checkpoint) == ("completed", "/c/step_1")
    assert store.finish(rid, "failed", error="late").status == "completed"  # first ending stands
    with pytest.raises(InvalidTransition):
        store.act(rid, "resume")


def test_active_runs_come_from_their_index(store):
    spec = RunSpec(name="idx")
    ids = [store.create(spec).run_id for _ in range(3)]
    for rid in ids:
        store.act(rid, "start")
    store.finish(ids[0], "completed")
    store.finish(ids[1], "failed", error="boom")
    assert [s.run_id for s in store.active()] == [ids[2]]
    if isinstance(store, RunStore):
        assert store.client.smembers(ACTIVE_RUNS) == {ids[2].encode()}
        assert len(store.list()) == 3
