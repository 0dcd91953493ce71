"""A training batch by reference: the groups a ``TrainingBatchRef`` names, read from
``scored``, and what is acknowledged with the batch once a checkpoint holds it."""

from __future__ import annotations

from dapo.transport.bus import Bus, Delivery
from proto.messages import SCORED_GROUP, ScoredGroup, TrainingBatch, TrainingBatchRef


def read_batch(bus: Bus, ref: TrainingBatchRef) -> TrainingBatch:
    """The batch ``ref`` refers to: its groups read from ``scored`` by entry id (one round
    trip), each checked to be the group the reference names, of this run. Raises
    ``ValueError`` naming the entries that are gone or are not those groups."""
    groups = bus.fetch("scored", ref.entry_ids, ScoredGroup)
    bad = [
        f"{eid} ({'gone' if g is None else f'holds {g.group_id!r} of run {g.run_id!r}'})"
        for eid, gid, g in zip(ref.entry_ids, ref.group_ids, groups, strict=True)
        if g is None or g.group_id != gid or g.run_id != ref.run_id
    ]
    if bad:
        raise ValueError(f"batch {ref.batch_id}: {len(bad)} of its {len(groups)} groups "
                         f"cannot be read from scored: {', '.join(bad[:5])}")  # fmt: skip
    return TrainingBatch(run_id=ref.run_id, batch_id=ref.batch_id, groups=groups,
                         stats=ref.stats, created_at=ref.created_at)  # fmt: skip


def with_groups(d: Delivery[TrainingBatchRef]) -> list[Delivery]:
    """A batch's delivery and its groups' entries on ``scored`` (pending in the sampler's
    group under the holder consumer): what is acknowledged, in one transaction, once a
    checkpoint holds the batch."""
    groups = [Delivery("scored", SCORED_GROUP, eid, None) for eid in d.message.entry_ids]
    return [d, *groups]
