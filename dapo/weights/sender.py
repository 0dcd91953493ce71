"""Learner side of the weight sync: ``WeightSender`` (protocol in ``dapo.weights``).

What a broadcast costs in memory. The layout is built in the wire dtype (``wire_dtype``,
the rollout engine's, e.g. bf16 under fp32 master weights; floating parameters are cast as
they are copied). With one rank, no cast and ``share_storage``, the parameters live in the
flat buffers themselves (``FlatBuffers.adopt``): nothing is copied. Otherwise the weights
stream (``dapo.weights.stream``): each bucket is filled from the source (a mapping, or an
iterator that may gather one parameter at a time) into one of a few reusable staging
buffers and broadcast while the next is filled; at most ``depth`` buckets are on the wire,
and a bucket's buffer is reused once sent, so a broadcast holds ``depth`` buckets beyond
the model (more only for a stream that comes out of layout order), never a model.

Double buffering (``start``): the learner hands over version v and goes on training while
v is on the wire. ``start`` snapshots the weights into the sender's own flat buffers (one
model in the wire dtype, reused) and returns; a thread broadcasts the snapshot. At most
one version is in flight: ``start`` of the next first waits for the previous one. The
caller collects outcomes with ``finished`` (a version is announced only once it reached a
worker). The learner's stall per broadcast is then the snapshot (plus any wait for the
previous transfer) instead of the whole transfer.

How long the learner waits. A broadcast must never hang the learner on a slow
or dead worker, yet a 64 GB model over a modest link legitimately takes
minutes. So it has three bounded stages:

- acks: at most ``join_timeout_s``. A rollout worker that takes updates between
  decode steps acks within one step; one that does not (busy elsewhere, or an
  engine without in-flight updates) is left out and catches up at a later
  update, since every broadcast carries the full weights;
- building a new group: at most the collective timeout,
  ``timeout_s + total_bytes / min_bandwidth``;
- sending: each bucket at most its own timeout, ``bucket_timeout_s + bucket_bytes /
  min_bandwidth`` (``stream.bucket_timeout_s``), set on the backend's op, so a dead or
  hung member is noticed within about one bucket's allowance; and the whole model within
  the collective timeout, so a crawling member (each bucket just in time) cannot hold the
  learner for buckets x timeout.

So ``broadcast`` returns or raises within about ``join_timeout_s`` + 2 x the
collective timeout. The timeouts are published in the rendezvous so workers wait as long
as the learner does, not less. A failed generation is dropped (NCCL communicators aborted,
``buckets.drop_group``) and the next update forms a new one from whoever acks; the learner
stays alive.

Where the store listens: ``dapo.weights.store``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dapo.weights.background import InFlight
from dapo.weights.buckets import (
    Bucket,
    FlatBuffers,
    NamedTensors,
    drop_group,
    make_group,
)
from dapo.weights.registry import (
    KEY_TTL_S,
    WeightKeys,
    WeightSyncError,
    _text,
    live_workers,
    publish_checkpoint,
    stale_or_mismatched_workers,
)
from dapo.weights.store import listen_socket, open_store
from dapo.weights.stream import (
    Source,
    StagingPool,
    bucket_timeout_s,
    send_buckets,
    stage_buckets,
    wire_layout,
)

KEEP_EXPECTED = 64
__all__ = ["WeightSender", "SyncStats", "listen_socket", "open_store"]


@dataclass(frozen=True)
class SyncStats:
    """Timings of one `WeightSender.broadcast`, in seconds; `bytes` counts the buckets."""

    version: int
    generation: int
    members: tuple[str, ...]
    new_group: bool
    bytes: int
    checksum: str
    rendezvous_s: float
    pack_s: float
    checksum_s: float
    broadcast_s: float
    total_s: float
    staging_bytes: int = 0
    """Most bytes of staging buffers held at once (0 when nothing was staged)."""


def collective_timeout_s(timeout_s: float, nbytes: int, min_bandwidth_mb_s: float) -> float:
    """How long sending ``nbytes`` may take: a fixed allowance plus the bytes at the slowest
    rate accepted (module doc)."""
    return timeout_s + nbytes / (min_bandwidth_mb_s * (1 << 20))


class WeightSender:
    """Learner side: owns the TCPStore, the generations and the source buffers.

    `named_params`: (name, tensor) in the model's order (meta tensors work: only the layout
    is read); kept by reference, so in-place updates are seen at each `broadcast`. With
    `share_storage` (the default), one rank and no dtype change, each parameter's `.data`
    is moved into its slot of the flat buffers (`FlatBuffers.adopt`): no pack copy and no
    second copy of the weights; optimizers keep working since the Parameter objects stay
    the same. Otherwise each broadcast streams through `depth` staging buckets (module
    doc). `wire_dtype`: the dtype floating parameters travel in (the rollout engine's).
    `join_timeout_s` (default `timeout_s`) bounds the wait for acks; a worker leaving a
    failed collective can ack the next update only if it is at least the collective
    timeout. The collective timeout (module doc) is `timeout_s` plus the layout's bytes at
    `min_bandwidth_mb_s` MiB/s; each bucket gets `bucket_timeout_s` (default `timeout_s`)
    plus its bytes at that rate. `double_buffer`: tells the learner loop to hand versions
    over with `start` (module doc) rather than `broadcast`.
    """

    def __init__(
        self,
        redis_client,
        run_id: str,
        named_params: NamedTensors,
        device: torch.device | str = "cpu",
        host: str = "127.0.0.1",
        port: int = 0,
        bucket_mb: float = 64.0,
        timeout_s: float = 60.0,
        join_timeout_s: float | None = None,
        share_storage: bool = True,
        min_bandwidth_mb_s: float = 100.0,
        wire_dtype: torch.dtype | None = None,
        bucket_timeout_s: float | None = None,
        depth: int = 2,
        double_buffer: bool = False,
    ) -> None:
        bucket_timeout_s = timeout_s if bucket_timeout_s is None else bucket_timeout_s
        if min(timeout_s, min_bandwidth_mb_s, bucket_timeout_s) <= 0 or depth < 1:
            raise ValueError(
                f"timeout_s ({timeout_s}), bucket_timeout_s ({bucket_timeout_s}) and "
                f"min_bandwidth_mb_s ({min_bandwidth_mb_s}) must be > 0, depth ({depth}) >= 1"
            )
        self.redis, self.keys = redis_client, WeightKeys(run_id)
        self.run_id = run_id
        self.device = torch.device(device)
        self.layout = wire_layout(named_params, bucket_mb, wire_dtype)
        self._params = dict(named_params)
        adopt = share_storage and all(
            t.device.type != "meta" and t.dtype == self.layout.slots[n].dtype
            for n, t in named_params
        )
        self.buffers = FlatBuffers(self.layout, self.device) if adopt else None
        if self.buffers is not None:
            self.buffers.adopt(named_params)
        self.pool = StagingPool(self.layout, self.device)
        self.depth, self.bucket_timeout_s = depth, bucket_timeout_s
        self.min_bandwidth_mb_s = min_bandwidth_mb_s
        self.timeout = timedelta(seconds=timeout_s)
        self.join_timeout_s = timeout_s if join_timeout_s is None else join_timeout_s
        self.collective_timeout = timedelta(
            seconds=collective_timeout_s(timeout_s, self.layout.total_bytes, min_bandwidth_mb_s)
        )
        self._store = open_store(host, port, self.timeout)
        self.host, self.port = host, self._store.port
        self.incarnation = uuid.uuid4().hex[:12]
        self.generation, self.members, self.version = 0, (), None
        self._members_key: tuple[tuple[str, str | None], ...] = ()
        self._group, self._last_attempt = None, None
        self.update = 0  # one per broadcast; receivers key updates by it, so a resend is new
        self.in_flight = InFlight(self)
        self.double_buffer = double_buffer  # the learner loop then uses `start`
        self.redis.delete(self.keys.rendezvous)
        self.redis.hset(self.keys.rendezvous, mapping=self._rendezvous_fields(timeout_s))

    def _rendezvous_fields(self, timeout_s: float) -> dict[str, str | int | float]:
        return {
            "host": self.host,
            "port": self.port,
            "incarnation": self.incarnation,
            "fingerprint": self.layout.fingerprint,
            "layout": self.layout.to_json(),
            "summary": self.layout.summary(),
            "bucket_mb": self.layout.bucket_mb,
            "backend": "nccl" if self.device.type == "cuda" else "gloo",
            "timeout_s": timeout_s,
            "collective_timeout_s": self.collective_timeout.total_seconds(),
            "bucket_timeout_s": self.bucket_timeout_s,
            "min_bandwidth_mb_s": self.min_bandwidth_mb_s,
            "join_timeout_s": self.join_timeout_s,
            "generation": 0,
        }

    def broadcast(self, version: int, named_params: Source | None = None) -> SyncStats:
        """Sends the current weights as `version` to every worker that acks in time.

        `named_params` replaces the tensors given at construction for this call: a mapping,
        or an iterator of (name, tensor) consumed exactly once, also when the broadcast
        fails (a sharded learner's other ranks take part in each gather). Versions never
        decrease; the same version may be sent again, to reach workers that missed it (each
        call is a new update). Waits for a version still in flight (`start`) first.
        Raises `WeightSyncError` (generation abandoned) when a member fails.
        """
        self.in_flight.wait()
        return self._broadcast(version, named_params, None)

    def start(self, version: int, named_params: Source | None = None) -> float:
        """Double buffering (module doc): snapshots the weights and broadcasts them in the
        background; returns the seconds the caller was held. Outcomes: `finished`."""
        self._check_version(version)
        return self.in_flight.start(version, named_params)

    def finished(self) -> list[SyncStats | WeightSyncError]:
        """Outcomes of background broadcasts completed since the last call, oldest first."""
        return self.in_flight.collect()

    @property
    def busy(self) -> bool:
        """Whether a version started with `start` is still on its way."""
        return self.in_flight.busy

    def _check_version(self, version: int) -> None:
        if self._last_attempt is not None and version < self._last_attempt:
            raise ValueError(f"version {version} is below the last one, {self._last_attempt}")

    def _broadcast(
        self, version: int, source: Source | None, laid_out: FlatBuffers | None
    ) -> SyncStats:
        """One update; `laid_out`: buffers already holding the weights (a snapshot)."""
        self._check_version(version)
        self._last_attempt = version
        self.update += 1
        start = time.perf_counter()
        source = self._params if source is None else source
        pairs = None if isinstance(source, Mapping) else iter(source)
        try:
            acked = self._collect_acks(version)
            members = tuple(sorted(acked))
            # a worker restarted under the same id is a new member: its old process's
            # connections in the current group are dead
            key = tuple((w, acked[w]) for w in members)
            new_group = bool(members) and (self._group is None or key != self._members_key)
            if new_group or not members:
                self._abandon()
            if new_group:
                self.generation += 1
            self._publish_plan(version, members)
            try:
                if new_group:
                    prefixed = dist.PrefixStore(f"gen{self.generation}", self._store)
                    self._group = make_group(
                        prefixed, 0, len(members) + 1, self.device, self.collective_timeout,
                        self.host,
                    )  # fmt: skip
                    self.members, self._members_key = members, key
                rendezvous_s = time.perf_counter() - start
                buckets = self._buckets(source if pairs is None else pairs, laid_out)
                checksum, pack_s, checksum_s = self._send(buckets)
            except RuntimeError as error:
                self._abandon()
                raise WeightSyncError(
                    f"weight broadcast of version {version} to generation {self.generation} "
                    f"(members {list(members)}) failed; generation abandoned: {error}"
                ) from error
        finally:
            for _ in pairs or ():  # the rest of a stream, so every gather completes
                pass
        self._publish_expected(version, checksum)
        self.version = version
        self.redis.hset(self.keys.rendezvous, "version", version)
        total_s = time.perf_counter() - start
        return SyncStats(
            version, self.generation, members, new_group, self.layout.total_bytes, checksum,
            rendezvous_s, pack_s, checksum_s,
            total_s - rendezvous_s - pack_s - checksum_s, total_s,
            self.pool.nbytes(),
        )  # fmt: skip

    def _collect_acks(self, version: int) -> dict[str, str | None]:
        """Steps 1-3: announce `version`, wait for the live workers' acks, return the ackers."""
        self.redis.hset(
            self.keys.rendezvous,
            mapping={"pending_version": version, "pending_update": self.update},
        )
        waiting = live_workers(self.redis, self.run_id)
        self._wake(waiting, version)
        ack_key = self.keys.acks(self.incarnation, self.update)
        deadline = time.monotonic() + self.join_timeout_s
        acked: dict[str, str | None] = {}  # worker -> its process's session
        while not waiting <= acked.keys() and (remaining := deadline - time.monotonic()) > 0:
            item = self.redis.blpop([ack_key], timeout=min(remaining, 0.5))
            if item is None:  # re-check liveness so a dead worker stops the wait early
                waiting = live_workers(self.redis, self.run_id) & waiting
            else:
                acked.update(self._accept(item[1]))
        while (raw := self.redis.lpop(ack_key)) is not None:
            acked.update(self._accept(raw))
        return acked

    def _accept(self, raw: bytes | str) -> dict[str, str | None]:
        """{worker: session} of one ack; empty for a worker with another layout (it refuses
        the plan itself and never becomes a member)."""
        ack = json.loads(raw)
        if ack["fingerprint"] != self.layout.fingerprint:
            return {}
        return {ack["worker_id"]: ack.get("session")}

    def _wake(self, workers, token) -> None:
        pipe = self.redis.pipeline()
        for worker in workers:
            pipe.rpush(self.keys.inbox(worker), str(token))
            pipe.ltrim(self.keys.inbox(worker), -8, -1)
            pipe.expire(self.keys.inbox(worker), KEY_TTL_S)
        pipe.execute()

    def _publish_plan(self, version: int, members: tuple[str, ...]) -> None:
        plan = {
            "version": version,
            "update": self.update,
            "incarnation": self.incarnation,
            "generation": self.generation,
            "members": list(members),
            "fingerprint": self.layout.fingerprint,
        }
        self.redis.hset(
            self.keys.rendezvous,
            mapping={"plan": json.dumps(plan), "generation": self.generation},
        )
        self._wake(members, "plan")

    def _buckets(
        self, source: Source, laid_out: FlatBuffers | None
    ) -> Iterator[tuple[Bucket, torch.Tensor, bool]]:
        """(bucket, flat, staged) in layout order; `staged`: a pool buffer to give back."""
        buffers = laid_out or self.buffers
        if buffers is None:
            for bucket, flat in stage_buckets(self.layout, source, self.pool):
                yield bucket, flat, True
            return
        if laid_out is None and not isinstance(source, Mapping):
            buffers.fill(source)  # adopted buffers, a stream given: copy it as it comes
            source = {}
        for bucket, flat in zip(self.layout.buckets, buffers.tensors, strict=True):
            if laid_out is None and source:
                buffers.pack_bucket(bucket.index, source, cast=True)  # no-op when adopted
            yield bucket, flat, False

    def _send(
        self, buckets: Iterator[tuple[Bucket, torch.Tensor, bool]]
    ) -> tuple[str, float, float]:
        deadline = time.monotonic() + self.collective_timeout.total_seconds()

        def timeout_of(bucket: Bucket) -> timedelta:
            limit = bucket_timeout_s(self.bucket_timeout_s, bucket.nbytes, self.min_bandwidth_mb_s)
            return timedelta(seconds=limit)

        return send_buckets(self._group, buckets, self.pool, timeout_of, deadline, self.depth)

    def _publish_expected(self, version: int, checksum: str) -> None:
        self.redis.hset(self.keys.expected, str(version), checksum)
        known = sorted(int(_text(v)) for v in self.redis.hkeys(self.keys.expected))
        if len(known) > KEEP_EXPECTED:
            self.redis.hdel(self.keys.expected, *[str(v) for v in known[:-KEEP_EXPECTED]])

    def _abandon(self) -> None:
        drop_group(self._group, self.device)
        self._group, self.members, self._members_key = None, (), ()
        # a failed op may still reference its staging buffer: never reuse those
        self.pool = StagingPool(self.layout, self.device)

    @property
    def group(self):
        """The current generation's process group (None between generations)."""
        return self._group

    def disagreeing_workers(self, version: int) -> dict[str, str]:
        """Live workers not holding ``version`` bit for bit, with why (see
        ``stale_or_mismatched_workers``)."""
        return stale_or_mismatched_workers(self.redis, self.run_id, version)

    def publish_checkpoint(self, version: int, checkpoint_dir: str) -> None:
        publish_checkpoint(self.redis, self.run_id, version, checkpoint_dir)

    def close(self) -> None:
        """Waits for a version in flight, drops the group and withdraws the rendezvous
        (workers then wait for a new learner)."""
        try:
            self.in_flight.wait()
        finally:
            self._abandon()
            self.redis.delete(self.keys.rendezvous)
            self._store = None
