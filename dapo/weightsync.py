"""Learner -> rollout weight sync over torch.distributed, with the rendezvous in Redis.

The learner (`WeightSender`, always rank 0, the broadcast root) and the rollout
workers (`WeightReceiver` in `dapo.weight_receiver`, ranks 1..N) form a process group per *generation*,
a fixed membership. Groups are built without `init_process_group` (which a
process may call once) from a TCPStore hosted by the learner: generation g
uses `PrefixStore(f"gen{g}", store)` and a `ProcessGroupGloo` (CPU) or
`ProcessGroupNCCL` (CUDA), chosen by the device, with the same code around it.
Parameters travel in the flat buckets of `dapo.buckets`.

Redis keys, all under `run_key(run_id, "weights")` = `dapo:{<run_id>}:weights:`
  rendezvous      hash, written by the learner at start: host, port (of its
                  TCPStore), incarnation (fresh per learner process),
                  fingerprint, layout (json specs + bucket_mb), summary,
                  backend, timeout_s, join_timeout_s; then per update
                  pending_version, plan (json: version, incarnation,
                  generation, members, fingerprint), generation and version
                  (last completed broadcast). Deleted by `WeightSender.close`.
  workers         hash worker_id -> json {fingerprint}, written by each worker
                  at join and on every heartbeat.
  alive:{w}       string with a TTL of `liveness_s`, refreshed by the worker's
                  heartbeat thread every liveness_s / 3; expiry = presumed dead.
  inbox:{w}       list; the learner pushes wake-up tokens so a worker blocked
                  in `poll` reacts at once (tokens carry no data).
  acks:{inc}:{v}  list; workers push json {worker_id, fingerprint} to take
                  part in version v.
  expected        hash version -> checksum of the learner's buffers (last 64).
  reports         hash worker_id -> json {version, checksum, time}.
  latest          hash {version, checkpoint_dir}: the newest checkpoint.

Joining: `WeightReceiver.join` waits for the rendezvous, builds its layout
from the learner's published specs (after checking its own parameter names and
shapes against them; dtypes may differ, `load_fn` converts), registers and
starts its heartbeat. It takes part from the next update on.

One update (learner `broadcast(v)`; workers `poll()` between generation batches):
  1. learner sets rendezvous.pending_version = v, pushes a token to the inbox
     of every live registered worker;
  2. a worker seeing a new (incarnation, pending_version) pushes its ack;
  3. the learner collects acks until every live worker answered or
     `join_timeout_s` passed; members = the ackers, sorted (rank = index + 1);
  4. if members differ from the current generation's (a join, a leave, a
     failure), generation += 1; the learner writes the plan and wakes the
     ackers; workers named in the plan build the new group if its
     (incarnation, generation) is new to them; a worker left out returns None;
  5. the learner packs bucket by bucket, starting each bucket's broadcast as
     soon as it is packed, computes the checksum while the bytes are in flight
     and publishes it in `expected`; workers receive, call `load_fn` with
     views of their buffers, and report version + checksum.

Failures. Building a group and every broadcast carry `timeout_s`; a member
that died or hangs makes the learner's `broadcast` raise `WeightSyncError`
within about that time, and the generation is abandoned: the next update
forms a new one from whoever acks. A worker whose collective fails raises
`WeightSyncError` from `poll` and simply acks the next update. A worker that
never acks (dead, or busy for longer than `join_timeout_s`) is left out of
that update; its registration is dropped once its `alive` key expires. Every
broadcast carries the full weights, so missing updates costs nothing but
staleness. A worker that starts late can load the newest checkpoint
(`needs_checkpoint`) to generate before the next update, which it joins by
acking it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from dapo.buckets import (
    BucketLayout,
    FlatBuffers,
    NamedTensors,
    drop_group,
    make_group,
    start_broadcast,
)
from dapo.keys import check_run_id, run_key

KEEP_EXPECTED = 64
KEY_TTL_S = 600


class WeightSyncError(RuntimeError):
    """A generation was abandoned (a member died, hung or could not connect)."""


class LayoutMismatchError(ValueError):
    """The learner's and the worker's bucket layouts differ."""


class CheckpointRef(NamedTuple):
    """The newest checkpoint the learner wrote: `(version, checkpoint_dir)`."""

    version: int
    checkpoint_dir: str


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


class WeightKeys:
    """Redis key names of one run's weight sync."""

    def __init__(self, run_id: str) -> None:
        base = run_key(check_run_id(run_id), "weights")
        self.rendezvous = f"{base}:rendezvous"
        self.workers = f"{base}:workers"
        self.expected = f"{base}:expected"
        self.reports = f"{base}:reports"
        self.latest = f"{base}:latest"
        self._base = base

    def alive(self, worker_id: str) -> str:
        return f"{self._base}:alive:{worker_id}"

    def inbox(self, worker_id: str) -> str:
        return f"{self._base}:inbox:{worker_id}"

    def acks(self, incarnation: str, version: int) -> str:
        return f"{self._base}:acks:{incarnation}:{version}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def live_workers(redis_client, run_id: str) -> set[str]:
    """Registered workers whose heartbeat key has not expired; drops the expired ones."""
    keys = WeightKeys(run_id)
    registered = [_text(w) for w in redis_client.hkeys(keys.workers)]
    pipe = redis_client.pipeline()
    for worker in registered:
        pipe.exists(keys.alive(worker))
    flags = pipe.execute()
    dead = [w for w, ok in zip(registered, flags, strict=True) if not ok]
    if dead:
        redis_client.hdel(keys.workers, *dead)
    return {w for w, ok in zip(registered, flags, strict=True) if ok}


def publish_checkpoint(redis_client, run_id: str, version: int, checkpoint_dir: str) -> None:
    """Learner side: records the newest checkpoint, for workers that missed updates."""
    redis_client.hset(
        WeightKeys(run_id).latest, mapping={"version": version, "checkpoint_dir": checkpoint_dir}
    )


def latest_checkpoint(redis_client, run_id: str) -> CheckpointRef | None:
    raw = redis_client.hgetall(WeightKeys(run_id).latest)
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return CheckpointRef(int(fields["version"]), fields["checkpoint_dir"])


def needs_checkpoint(redis_client, run_id: str, current_version: int) -> CheckpointRef | None:
    """The checkpoint to load first if it is newer than `current_version` (-1 = no weights)."""
    ref = latest_checkpoint(redis_client, run_id)
    return ref if ref is not None and ref.version > current_version else None


def stale_or_mismatched_workers(
    redis_client, run_id: str, version: int | None = None
) -> dict[str, str]:
    """Live workers that do not hold `version` (default: newest broadcast) bit for bit.

    Returns worker_id -> reason ("no report", "stale: ...", "checksum mismatch
    ...", "unverified ..."); an empty dict means every live worker agrees.
    """
    keys = WeightKeys(run_id)
    expected = {int(_text(k)): _text(v) for k, v in redis_client.hgetall(keys.expected).items()}
    if version is None:
        if not expected:
            return {}
        version = max(expected)
    reports = {_text(k): json.loads(v) for k, v in redis_client.hgetall(keys.reports).items()}
    verdicts: dict[str, str] = {}
    for worker in sorted(live_workers(redis_client, run_id)):
        report = reports.get(worker)
        if report is None:
            verdicts[worker] = "no report"
            continue
        held, checksum = int(report["version"]), report.get("checksum")
        if held < version:
            verdicts[worker] = f"stale: holds version {held}, expected {version}"
        elif checksum is None:
            verdicts[worker] = f"unverified: version {held} reported without checksum"
        elif held not in expected:
            verdicts[worker] = f"unknown version {held}: no expected checksum"
        elif checksum != expected[held]:
            verdicts[worker] = f"checksum mismatch at version {held}"
    return verdicts


class WeightSender:
    """Learner side: owns the TCPStore, the generations and the source buffers.

    `named_params`: (name, tensor) in the model's order; kept by reference, so
    in-place updates are seen at each `broadcast`. With `share_storage` (the
    default) each parameter's `.data` is moved into its slot of the flat
    buffers (`FlatBuffers.adopt`): no pack copy and no second copy of the
    weights in memory; optimizers keep working since the Parameter objects
    stay the same. A tensor found elsewhere at broadcast time (re-created,
    moved, or passed in `broadcast(named_params=...)`) is simply copied.
    `timeout_s` bounds group building and each broadcast; `join_timeout_s`
    (default `timeout_s`) bounds the wait for acks and should be at least
    `timeout_s` so a worker leaving a failed collective can ack the next one.
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
    ) -> None:
        self.redis, self.keys = redis_client, WeightKeys(run_id)
        self.run_id = run_id
        self.device = torch.device(device)
        self.layout = BucketLayout.from_named(named_params, bucket_mb)
        self.buffers = FlatBuffers(self.layout, self.device)
        self._params = dict(named_params)
        if share_storage:
            self.buffers.adopt(named_params)
        self.timeout = timedelta(seconds=timeout_s)
        self.join_timeout_s = timeout_s if join_timeout_s is None else join_timeout_s
        self._store = dist.TCPStore(
            host, port, is_master=True, wait_for_workers=False, timeout=self.timeout
        )
        self.host, self.port = host, self._store.port
        self.incarnation = uuid.uuid4().hex[:12]
        self.generation, self.members, self.version = 0, (), None
        self._group, self._last_attempt = None, None
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
            "join_timeout_s": self.join_timeout_s,
            "generation": 0,
        }

    def broadcast(
        self, version: int, named_params: NamedTensors | Mapping | None = None
    ) -> SyncStats:
        """Sends the current weights as `version` to every worker that acks in time.

        `named_params` replaces the tensors given at construction for this call
        (e.g. a freshly gathered full state dict). Versions must increase.
        Raises `WeightSyncError` (generation abandoned) when a member fails.
        """
        if self._last_attempt is not None and version <= self._last_attempt:
            raise ValueError(f"version {version} is not above the last one, {self._last_attempt}")
        self._last_attempt = version
        start = time.perf_counter()
        params = self._params if named_params is None else dict(named_params)
        members = self._collect_acks(version)
        new_group = bool(members) and (self._group is None or members != self.members)
        if new_group or not members:
            self._abandon()
        if new_group:
            self.generation += 1
        self._publish_plan(version, members)
        try:
            if new_group:
                prefixed = dist.PrefixStore(f"gen{self.generation}", self._store)
                self._group = make_group(
                    prefixed, 0, len(members) + 1, self.device, self.timeout, self.host
                )
                self.members = members
            rendezvous_s = time.perf_counter() - start
            works, pack_s = self._pack_and_send(params)
            tick = time.perf_counter()
            checksum = self.buffers.checksum()  # overlaps with the bytes in flight
            checksum_s = time.perf_counter() - tick
            self._publish_expected(version, checksum)
            for work in works:
                work.wait(self.timeout)
        except RuntimeError as error:
            self._abandon()
            raise WeightSyncError(
                f"weight broadcast of version {version} to generation {self.generation} "
                f"(members {list(members)}) failed; generation abandoned: {error}"
            ) from error
        self.version = version
        self.redis.hset(self.keys.rendezvous, "version", version)
        total_s = time.perf_counter() - start
        return SyncStats(
            version, self.generation, members, new_group, self.layout.total_bytes, checksum,
            rendezvous_s, pack_s, checksum_s,
            total_s - rendezvous_s - pack_s - checksum_s, total_s,
        )  # fmt: skip

    def _collect_acks(self, version: int) -> tuple[str, ...]:
        """Steps 1-3: announce `version`, wait for the live workers' acks, return the ackers."""
        self.redis.hset(self.keys.rendezvous, "pending_version", version)
        waiting = live_workers(self.redis, self.run_id)
        self._wake(waiting, version)
        ack_key = self.keys.acks(self.incarnation, version)
        deadline = time.monotonic() + self.join_timeout_s
        acked: set[str] = set()
        while not waiting <= acked and (remaining := deadline - time.monotonic()) > 0:
            item = self.redis.blpop([ack_key], timeout=min(remaining, 0.5))
            if item is None:  # re-check liveness so a dead worker stops the wait early
                waiting = live_workers(self.redis, self.run_id) & waiting
            else:
                acked |= self._accept(item[1])
        while (raw := self.redis.lpop(ack_key)) is not None:
            acked |= self._accept(raw)
        return tuple(sorted(acked))

    def _accept(self, raw: bytes | str) -> set[str]:
        ack = json.loads(raw)
        # A worker with another layout refuses the plan itself; it never becomes a member.
        return {ack["worker_id"]} if ack["fingerprint"] == self.layout.fingerprint else set()

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

    def _pack_and_send(self, params: Mapping[str, torch.Tensor]) -> tuple[list, float]:
        """Packs bucket i+1 while bucket i is on the wire; returns the works and the pack time."""
        works, pack_s = [], 0.0
        for index, flat in enumerate(self.buffers.byte_views):
            tick = time.perf_counter()
            self.buffers.pack_bucket(index, params)
            pack_s += time.perf_counter() - tick
            if self._group is not None:
                works.append(start_broadcast(self._group, flat, self.timeout))
        return works, pack_s

    def _publish_expected(self, version: int, checksum: str) -> None:
        self.redis.hset(self.keys.expected, str(version), checksum)
        known = sorted(int(_text(v)) for v in self.redis.hkeys(self.keys.expected))
        if len(known) > KEEP_EXPECTED:
            self.redis.hdel(self.keys.expected, *[str(v) for v in known[:-KEEP_EXPECTED]])

    def _abandon(self) -> None:
        drop_group(self._group, self.device)
        self._group, self.members = None, ()

    @property
    def group(self):
        """The current generation's process group (None between generations)."""
        return self._group

    def publish_checkpoint(self, version: int, checkpoint_dir: str) -> None:
        publish_checkpoint(self.redis, self.run_id, version, checkpoint_dir)

    def close(self) -> None:
        """Drops the group and withdraws the rendezvous (workers then wait for a new learner)."""
        self._abandon()
        self.redis.delete(self.keys.rendezvous)
        self._store = None
