"""Batches by reference, on a real Redis and on the in-memory bus: a batch entry stays a few
dozen bytes per group whatever the groups weigh, its groups stay on ``scored`` held for the
learner, and a sampler killed after publishing a reference neither gets those groups back
nor counts anything twice."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from dapo.runtime.runs import MemoryRunStore, RunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.memory_bus import MemoryBroker, MemoryBus
from dapo.transport.redis_bus import RedisBus
from proto.messages import HELD_CONSUMER, ScoredGroup, ScoredSample
from tests.services.sampler.test_sampler_loop import (
    dispatched,
    identity_holds,
    learner_trained,
    new_sampler,
    source_for,  # noqa: F401 -- the fixture
    spec_of,
)


@pytest.fixture(params=["redis", "memory"])
def context(request, redis_url):
    """``context(spec)``: a running run; a second context of the same test is the sampler
    restarted (a new bus client over the same server or broker)."""
    made: dict = {}

    def make(spec):
        if "store" not in made:
            if request.param == "redis":
                made["client"] = redis.Redis.from_url(redis_url)
                made["store"] = RunStore(made["client"])
            else:
                made["store"], made["broker"] = MemoryRunStore(), MemoryBroker()
            made["run_id"] = made["store"].create(spec).run_id
            made["store"].act(made["run_id"], "start")
        run_id = made["run_id"]
        if request.param == "redis":
            bus = RedisBus(made["client"], run_id)
        else:
            bus = MemoryBus(run_id, broker=made["broker"])
        return ServiceContext("sampler", run_id, spec, "sampler-0", bus, made["store"])

    return make


def long_group(run_id: str, gid: str, accs: list[bool], tokens: int) -> ScoredGroup:
    """A group of answers ``tokens`` long (ids and log-probs: 8 bytes a token each)."""
    samples = [
        ScoredSample(
            response_ids=np.full(tokens, 65, np.int32),
            logprobs=np.full(tokens, -0.5, np.float32),
            finish_reason="length",
            versions=[0],
            version_starts=[0],
            score=1.0 if a else -1.0,
            acc=a,
            overlong_penalty=0.0,
            length=tokens,
            truncated=True,
        )
        for a in accs
    ]
    return ScoredGroup(run_id=run_id, group_id=gid, prompt_id=f"p-{gid}", prompt_ids=[49, 43],
                       ground_truth="2", n=len(accs), policy_version=0, worker_id="w",
                       engine="hf", gen_seconds=0.0, samples=samples)  # fmt: skip


def raw(bus):
    """The bus under the service context's wrapper (if it wraps it)."""
    return getattr(bus, "inner", bus)


def entry_sizes(bus, stream: str) -> list[int]:
    """Bytes of every entry of ``stream`` as stored."""
    bus = raw(bus)
    if isinstance(bus, RedisBus):
        entries = [f for _, f in bus.client.xrange(bus.key(stream))]
    else:
        entries = list(bus.streams.get(stream, {}).values())
    return [sum(len(k) + len(v) for k, v in f.items()) for f in entries]


def held(bus) -> int:
    lag = bus.lag("scored").get("sampler")
    return lag.pending if lag else 0


@pytest.mark.parametrize("tokens", [4, 40_000])
def test_a_batch_entry_stays_small_whatever_its_groups_weigh(context, source_for, tokens):  # noqa: F811
    ctx = context(spec_of(max_staleness=1))
    learner_trained(ctx, 0)
    sampler = new_sampler(ctx, source_for(ctx.spec))
    sampler.step()
    for gid in dispatched(ctx)[:2]:
        ctx.bus.publish("scored", long_group(ctx.run_id, gid, [True, False, True, False], tokens))
    sampler.step()
    [size] = entry_sizes(ctx.bus, "batches")
    assert min(entry_sizes(ctx.bus, "scored")) > 4 * tokens * 8  # the groups grow ...
    assert size < 1024  # ... their batch does not: two ids per group and the stats
    (ref,) = ctx.bus.read("batches")[1]
    groups = ctx.bus.fetch("scored", ref.entry_ids)
    assert [g.group_id for g in groups] == ref.group_ids == dispatched(ctx)[:2]
    assert groups[0].samples[0].length == tokens and held(ctx.bus) == 2


def test_a_sampler_killed_after_publishing_a_reference_loses_and_repeats_nothing(
    context,
    source_for,  # noqa: F811
):
    ctx = context(spec_of(max_staleness=1))
    learner_trained(ctx, 0)
    sampler = new_sampler(ctx, source_for(ctx.spec))
    sampler.step()
    g = dispatched(ctx)
    for gid, accs in zip(g, ([True, False], [True, True], [False, True]), strict=False):
        ctx.bus.publish("scored", long_group(ctx.run_id, gid, accs * 2, 3))
    sampler.step()  # batch 0: g0 and g2; g1 filtered
    acc = sampler.account()
    assert (acc["batches"], acc["trained"], acc["filtered_all_correct"]) == (1, 2, 1)
    assert held(ctx.bus) == 2
    # killed: a new process with a new client; the groups of batch 0 are the learner's now
    restarted = new_sampler(context(ctx.spec), source_for(ctx.spec))
    restarted.step()
    assert restarted._assembler.held == [] and restarted.account() == sampler.account()
    learner_trained(restarted.rt, 1)
    more = [gid for gid in dispatched(restarted.rt) if gid not in g[:3]]
    for gid in more[:2]:
        restarted.rt.bus.publish("scored", long_group(ctx.run_id, gid, [True, False] * 2, 3))
    restarted.step()
    refs = restarted.rt.bus.read("batches")[1]
    assert [r.batch_id for r in refs] == [0, 1]
    assert refs[0].group_ids == [g[0], g[2]] and refs[1].group_ids == more[:2]
    assert held(restarted.rt.bus) == 4  # both batches' groups wait for the learner
    identity_holds(restarted)
    bus = raw(restarted.rt.bus)
    if isinstance(bus, RedisBus):
        rows = bus.client.xpending_range(bus.key("scored"), "sampler", "-", "+", 100)
        assert {r["consumer"].decode() for r in rows} == {HELD_CONSUMER}
