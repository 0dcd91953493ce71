"""Holding and fetching by id, one atomic acknowledgement across streams, and the bound on an
entry's size: both buses (``RedisBus`` on a real private redis-server, ``MemoryBus``)."""

from __future__ import annotations

import pytest
import redis

from dapo.transport.bus import BusSettings, EntryTooLarge, FencedOut
from dapo.transport.redis_bus import RedisBus
from proto.messages import HELD_CONSUMER, TrainingBatchRef
from tests.dapo.transport import test_bus_contract
from tests.factories import scored_group

new_bus = test_bus_contract.new_bus
"""Both buses, as the contract's tests have them."""


def published_groups(bus, run_id: str, n: int):
    """``n`` scored groups on ``scored``, delivered to the sampler's group."""
    for i in range(n):
        bus.publish("scored", scored_group(run_id, f"g{i}", [True, False]))
    return bus.consume("scored", "sampler", "s0", count=n, block_ms=10, reclaim=False)


def held_by(bus, run_id: str) -> dict[str, str]:
    """entry id -> consumer of every pending entry of ``scored``/``sampler``."""
    if isinstance(bus, RedisBus):
        rows = bus.client.xpending_range(bus.key("scored"), "sampler", "-", "+", 100)
        return {r["message_id"].decode(): r["consumer"].decode() for r in rows}
    group = bus.broker.groups[("scored", "sampler")]
    return {f"{seq}-0": p.consumer for seq, p in group.pending.items()}


def test_held_entries_stay_pending_are_not_handed_out_again_and_are_fetched_by_id(new_bus, run_id):
    bus = new_bus()
    got = published_groups(bus, run_id, 4)
    kept, filtered = got[:3], got[3:]
    ref = TrainingBatchRef(run_id=run_id, batch_id=0, entry_ids=[d.entry_id for d in kept],
                           group_ids=[d.message.group_id for d in kept])  # fmt: skip
    bus.commit(stream="batches", msg=ref, hold=kept, holder=HELD_CONSUMER, ack=filtered)
    assert held_by(bus, run_id) == {d.entry_id: HELD_CONSUMER for d in kept}
    if isinstance(bus, RedisBus):
        bus.trim("scored")  # a trim keeps what is pending, held or not
    restarted = new_bus()  # a restarted sampler does not get the held groups back
    assert restarted.consume("scored", "sampler", "s0", count=10, block_ms=10,
                             reclaim=False) == []  # fmt: skip
    [batch] = restarted.consume("batches", "learner", "l0", count=1, block_ms=10)
    groups = restarted.fetch("scored", batch.message.entry_ids)
    assert [g.group_id for g in groups] == ["g0", "g1", "g2"]
    assert [g.samples[0].acc for g in groups] == [True] * 3
    gone, first = restarted.fetch("scored", ["9999999-0", kept[0].entry_id])
    assert gone is None and first.group_id == "g0"
    # the batch and its groups go together
    restarted.ack_many([batch, *kept])
    assert held_by(bus, run_id) == {} and bus.lag("batches")["learner"].pending == 0


def test_a_fenced_acknowledgement_of_a_batch_and_its_groups_is_all_or_nothing(redis_url, run_id):
    client = redis.Redis.from_url(redis_url)
    lease = f"dapo:{{{run_id}}}:learner:lease"
    client.set(lease, b"1:old")
    bus = RedisBus(client, run_id)
    kept = published_groups(bus, run_id, 2)
    ref = TrainingBatchRef(run_id=run_id, batch_id=0, entry_ids=[d.entry_id for d in kept],
                           group_ids=[d.message.group_id for d in kept])  # fmt: skip
    bus.commit(stream="batches", msg=ref, hold=kept, holder=HELD_CONSUMER)
    old = RedisBus(client, run_id, fence=(lease, b"1:old"))
    [batch] = old.consume("batches", "learner", "l0", count=1, block_ms=10, reclaim=False)
    client.set(lease, b"2:new")  # a successor took the lease
    with pytest.raises(FencedOut):
        old.ack_many([batch, *kept])
    assert len(held_by(bus, run_id)) == 2 and bus.lag("batches")["learner"].pending == 1
    RedisBus(client, run_id, fence=(lease, b"2:new")).ack_many([batch, *kept])
    assert held_by(bus, run_id) == {} and bus.lag("batches")["learner"].pending == 0


def test_an_entry_over_the_bound_is_refused_naming_the_stream_and_its_size(new_bus, run_id):
    bus = new_bus(max_entry_bytes=4096)
    small = published_groups(bus, run_id, 1)
    big = scored_group(run_id, "big", [True, False], prompt=tuple(range(1, 2000)))
    with pytest.raises(EntryTooLarge, match=r"scored_group entry of \d+ bytes .* stream 'scored'"):
        bus.commit(stream="scored", msg=big, ack=small)
    # nothing of the commit happened: no entry, the acknowledgement not done either
    assert bus.length("scored") == 1 and bus.lag("scored")["sampler"].pending == 1
    bus.commit(stream="scored", msg=scored_group(run_id, "fits", [True, False]), ack=small)
    assert bus.length("scored") == 2 and bus.lag("scored")["sampler"].pending == 0


def test_the_bound_stays_well_under_redis_proto_max_bulk_len():
    assert BusSettings().max_entry_bytes == 64 << 20
    with pytest.raises(ValueError, match="max_entry_bytes"):
        BusSettings(max_entry_bytes=512 << 20)
