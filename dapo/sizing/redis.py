"""Redis memory and its append-only file, from the run spec and real encoded messages.

Sizes are not guessed: each stream entry's size is that of a real message of the planned
shape encoded by ``proto.codec`` (a group of n samples of the planned response length; a
batch reference of train_batch_size groups). The counts follow the data path as it is:

- ``prompts``: the sampler keeps at most ``spec.in_flight_limit`` prompts dispatched and
  not yet scored (``trainer.max_in_flight``, 0 = 2 * train_batch_size);
- ``rollouts``: each of those is at most one pending ``RolloutGroup``;
- ``scored``: a kept group stays unacknowledged while its batch is filled, then, held for
  the learner, until the checkpoint after the batch is trained
  (``services/learner/service.py`` acknowledges a batch and its groups together); and
  acknowledged entries can be trimmed only below the oldest unacknowledged one, so the
  stream holds every group scored since the oldest kept group of the oldest batch not
  yet checkpointed: up to ``save_freq`` trained batches (every batch of the run when
  save_freq is 0), the ``max_staleness + 1`` published ahead and the one being filled,
  each train_batch_size / keep_rate groups;
- ``batches``: small references (``TrainingBatchRef``: entry and group ids), as many as
  batches not yet checkpointed: up to ``save_freq`` plus the ``max_staleness + 1`` ahead;
- every stream: a publisher trims its stream once per ``trim_every`` of its own publishes
  (``dapo.transport.bus.BusSettings.trim_every``), so up to that many acknowledged entries
  per publisher wait for the next trim.

No stream holds more than the run ever publishes.
"""

from __future__ import annotations

import math

import numpy as np

from proto.codec import encode
from proto.messages import (
    PromptTask,
    RolloutGroup,
    Sample,
    SamplingParams,
    ScoredGroup,
    ScoredSample,
    TrainingBatch,
    TrainingBatchRef,
)
from proto.runspec import RunSpec

TRIM_EVERY = 64
"""Publishes between trims of a stream (``BusSettings.trim_every``)."""
PROTO_MAX_BULK_LEN = 512 << 20
"""Redis's default ``proto-max-bulk-len``: a larger field cannot be written."""
MAX_ENTRY_BYTES = 64 << 20
"""Largest entry the bus publishes (``BusSettings.max_entry_bytes``)."""
STREAM_NODE_MAX_BYTES = 4096
"""Redis's default ``stream-node-max-bytes``: smaller entries share a node."""
AOF_REWRITE_MIN_BYTES = 64 << 20
"""Redis's default ``auto-aof-rewrite-min-size``."""
STAMP = 1_764_000_000.1234567
"""A Unix time as ``time.time()`` writes it (its digits count), so sizes are repeatable."""
CHARS_PER_TOKEN = 4
"""Characters of prompt text per prompt token (English text under a BPE vocabulary);
only the small prompt tasks carry text."""


def encoded_bytes(msg) -> int:
    """Bytes of a message as stream fields: the field names and values ``proto.codec``
    writes (version, kind, JSON header, packed arrays)."""
    return sum(len(k) + len(v) for k, v in encode(msg).items())


def _ids(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.int32) % 50_000 + 1


def _sample(resp: int, scored: bool) -> Sample:
    # a near-worst header: a truncated sample with a non-zero penalty and an answer
    fields = dict(
        response_ids=_ids(resp),
        logprobs=np.full(resp, -0.25, dtype=np.float32),
        finish_reason="length",
        versions=[0],
        version_starts=[0],
    )
    if not scored:
        return Sample(**fields)
    return ScoredSample(
        **fields,
        score=-1.0,
        acc=False,
        overlong_penalty=-1.0,
        length=resp,
        truncated=True,
        pred="12345",
    )


def group_message(spec: RunSpec, prompt: int, resp: int, scored: bool, gid: str = "g0"):
    """A real group of the run's shape: n samples of ``resp`` tokens after ``prompt``."""
    cls = ScoredGroup if scored else RolloutGroup
    n = spec.rollout.n
    return cls(
        run_id="r" * 24,
        group_id=f"{gid}-{'0' * 32}",
        prompt_id="train.parquet:00000000",
        prompt_ids=_ids(prompt),
        ground_truth="12345",
        data_source="math",
        n=n,
        policy_version=0,
        worker_id="rollout-00",
        engine=spec.rollout.engine,
        gen_seconds=1.0,
        finished_at=STAMP,
        samples=[_sample(resp, scored) for _ in range(n)],
    )


def prompt_task_bytes(spec: RunSpec, prompt: int) -> int:
    """One ``PromptTask`` of ``prompt`` tokens and ``CHARS_PER_TOKEN`` characters per token."""
    sampling = SamplingParams(n=spec.rollout.n, max_new_tokens=spec.data.max_response_length)
    task = PromptTask(
        run_id="r" * 24,
        group_id="g" * 34,
        prompt_id="train.parquet:00000000",
        prompt_text="x" * (prompt * CHARS_PER_TOKEN),
        prompt_ids=_ids(prompt),
        ground_truth="12345",
        sampling=sampling,
        created_at=STAMP,
    )
    return encoded_bytes(task)


def group_bytes(spec: RunSpec, prompt: int, resp: int, scored: bool) -> int:
    """One encoded group (``RolloutGroup``, or ``ScoredGroup`` when ``scored``)."""
    return encoded_bytes(group_message(spec, prompt, resp, scored))


def batch_ref_bytes(spec: RunSpec) -> int:
    """One encoded ``TrainingBatchRef`` of train_batch_size groups: a real one, with entry
    ids as Redis writes them (milliseconds, sequence) and group ids as the sampler names
    them (``<run_id>-<seq>``)."""
    n = spec.data.train_batch_size
    ref = TrainingBatchRef(
        run_id="r" * 24,
        batch_id=spec.trainer.total_training_steps,
        entry_ids=[f"{int(STAMP * 1000) + i}-{i % 100}" for i in range(n)],
        group_ids=[f"{'r' * 24}-{10_000_000 + i}" for i in range(n)],
        created_at=STAMP,
    )
    return encoded_bytes(ref)


def batch_bytes(spec: RunSpec, prompt: int, resp: int) -> int:
    """One encoded ``TrainingBatch`` of train_batch_size groups, as the learner rebuilds it
    from a reference and its groups (what a learner rank holds): a real batch of one group,
    plus (train_batch_size - 1) times what a second group adds to it (the header's offsets
    grow by a digit now and then: the second group is a fair increment)."""
    one = group_message(spec, prompt, resp, scored=True)
    two = group_message(spec, prompt, resp, scored=True, gid="g1")
    b1 = encoded_bytes(TrainingBatch(run_id="r" * 24, batch_id=0, groups=[one], created_at=STAMP))
    b2 = encoded_bytes(
        TrainingBatch(run_id="r" * 24, batch_id=0, groups=[one, two], created_at=STAMP)
    )
    return b1 + (spec.data.train_batch_size - 1) * (b2 - b1)


def allocation_bytes(size: int) -> int:
    """What Redis's allocator (jemalloc) takes for ``size`` bytes: sizes in (2^k, 2^(k+1)]
        are rounded up to a multiple of 2^(k-2), four size classes per doubling, so at most 25%
        more. Up to ``STREAM_NODE_MAX_BYTES`` the size is taken as it is (``stream_bytes`` packs
    such entries into nodes)."""
    if size <= STREAM_NODE_MAX_BYTES:
        return size
    step = 1 << max((size - 1).bit_length() - 3, 0)
    return -(-size // step) * step


def stream_entries(
    spec: RunSpec,
    keep_rate: float,
    rollout_workers: int,
    reward_replicas: int,
    trim_every: int = TRIM_EVERY,
) -> dict[str, int]:
    """Most entries each stream holds at once (see the module docstring), each capped by
    what the whole run publishes: total_training_steps batches, and the groups to fill
    them (total * train_batch_size / keep_rate) plus the prompts still in flight."""
    d, t = spec.data, spec.trainer
    in_flight = spec.in_flight_limit
    groups_total = math.ceil(t.total_training_steps * d.train_batch_size / keep_rate) + in_flight
    ahead = spec.algorithm.max_staleness + 1
    unacked = t.save_freq or t.total_training_steps
    # trained and not checkpointed, published ahead, and the one being filled
    held = math.ceil((unacked + ahead + 1) * d.train_batch_size / keep_rate)
    return {
        "prompts": min(in_flight + trim_every, groups_total),
        "rollouts": min(in_flight + trim_every * rollout_workers, groups_total),
        "scored": min(held + trim_every * reward_replicas, groups_total),
        "batches": min(unacked + ahead + trim_every, t.total_training_steps),
    }


def entry_sizes(spec: RunSpec, prompt: int, resp: int) -> dict[str, int]:
    """Encoded bytes of one entry of each stream."""
    return {
        "prompts": prompt_task_bytes(spec, prompt),
        "rollouts": group_bytes(spec, prompt, resp, scored=False),
        "scored": group_bytes(spec, prompt, resp, scored=True),
        "batches": batch_ref_bytes(spec),
    }


def stream_bytes(entries: dict[str, int], sizes: dict[str, int]) -> dict[str, int]:
    """Memory of each stream. An entry larger than a node (``STREAM_NODE_MAX_BYTES``) takes
    its own allocation; smaller ones share nodes, each filled to the limit plus the entry
    that passes it, and a stream has at least one."""
    out = {}
    for name, count in entries.items():
        size = sizes[name]
        if size > STREAM_NODE_MAX_BYTES:
            out[name] = count * allocation_bytes(size)
        else:
            nodes = max(math.ceil(count * size / STREAM_NODE_MAX_BYTES), 1)
            out[name] = nodes * allocation_bytes(STREAM_NODE_MAX_BYTES + size)
    return out


def aof_volume_bytes(data_bytes: float) -> float:
    """Disk for the append-only file. Redis 7 keeps a base file (an RDB snapshot, about the
    data) and an incremental file of the writes since; an automatic rewrite starts when
    the incremental file reaches the base's size (``auto-aof-rewrite-percentage`` 100, not
    below ``auto-aof-rewrite-min-size``), and writes a new base while the old base and
    increment are still on disk: 3 * max(data, min size)."""
    return 3.0 * max(data_bytes, AOF_REWRITE_MIN_BYTES)


def memory_limit_bytes(maxmemory: float, largest_entry: float) -> float:
    """The Redis container's memory limit: maxmemory, plus as much again for the pages the
    AOF rewrite's fork copies when writes touch them (worst case: every page), plus one
    largest entry for a client's reply buffer."""
    return 2.0 * maxmemory + largest_entry
