"""Learner side of the weight sync: ``WeightSender`` (protocol in ``dapo.weights``).

How long the learner waits. A broadcast must never hang the learner on a slow
or dead worker, yet a 64 GB model over a modest link legitimately takes
minutes. So it has three bounded stages:

- acks: at most ``join_timeout_s``. A rollout worker that takes updates between
  decode steps acks within one step; one that does not (busy elsewhere, or an
  engine without in-flight updates) is left out and catches up at a later
  update, since every broadcast carries the full weights;
- building a new group, and sending all buckets: each at most the collective
  timeout, ``timeout_s + total_bytes / min_bandwidth``. One budget for the
  whole model, growing with its bytes, rather than a fixed timeout per bucket:
  a per-bucket timeout bounds a hung member but lets a crawling one (each
  bucket just in time) hold the learner for buckets x timeout, and a single
  fixed timeout would be wrong for either a 0.5B or a 32B model. The buckets
  are waited on against one deadline.

So ``broadcast`` returns or raises within about ``join_timeout_s`` + 2 x the
collective timeout. The collective timeout is published in the rendezvous so
workers wait as long as the learner does, not less.

Where the store listens. torch's TCPStore binds every interface whatever host it is
given, which exposes it on networks the learner never meant to serve (the store has no
authentication). So the learner binds its own socket to ``(host, port)`` when ``host`` is an
address of this machine and hands it to the store (``listen_socket``); only a host that is
not (a NAT or load-balancer address) falls back to torch's every-interface listener.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dapo.weights.buckets import (
    BucketLayout,
    FlatBuffers,
    NamedTensors,
    drop_group,
    make_group,
    start_broadcast,
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

KEEP_EXPECTED = 64
log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket | None:
    """A socket bound to ``(host, port)`` and listening, when ``host`` resolves to an address
    of this machine; None when it does not resolve or is not local (module doc). A port in
    use raises, as the store itself would."""
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    for family, kind, proto, _, address in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
    return None


def open_store(host: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """The learner's TCPStore, listening on ``host`` only when that is a local address."""
    sock = listen_socket(host, port)
    if sock is None:
        log.warning("weight-sync host %r is not an address of this machine: the store "
                    "listens on every interface", host)  # fmt: skip
        return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout)
    bound_port, fd = sock.getsockname()[1], sock.detach()  # the store owns (and closes) it
    return dist.TCPStore(
        host, bound_port, is_master=True, wait_for_workers=False, timeout=timeout,
        master_listen_fd=fd,
    )  # fmt: skip


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


def collective_timeout_s(timeout_s: float, nbytes: int, min_bandwidth_mb_s: float) -> float:
    """How long sending ``nbytes`` may take: a fixed allowance plus the bytes at the slowest
    rate accepted (module doc)."""
    return timeout_s + nbytes / (min_bandwidth_mb_s * (1 << 20))


class WeightSender:
    """Learner side: owns the TCPStore, the generations and the source buffers.

    `named_params`: (name, tensor) in the model's order; kept by reference, so
    in-place updates are seen at each `broadcast`. With `share_storage` (the
    default) each parameter's `.data` is moved into its slot of the flat
    buffers (`FlatBuffers.adopt`): no pack copy and no second copy of the
    weights in memory; optimizers keep working since the Parameter objects
    stay the same. A tensor found elsewhere at broadcast time (re-created,
    moved, or passed in `broadcast(named_params=...)`) is simply copied.
    `join_timeout_s` (default `timeout_s`) bounds the wait for acks; a worker
    leaving a failed collective can ack the next update only if it is at least
    the collective timeout. The collective timeout (module doc) is `timeout_s`
    plus the layout's bytes at `min_bandwidth_mb_s` MiB/s; it bounds building a
    group and the whole transfer of one broadcast.
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
    ) -> None:
        if timeout_s <= 0 or min_bandwidth_mb_s <= 0:
            raise ValueError(
                f"timeout_s ({timeout_s}) and min_bandwidth_mb_s ({min_bandwidth_mb_s}) must be > 0"
            )
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
        self.collective_timeout = timedelta(
            seconds=collective_timeout_s(timeout_s, self.layout.total_bytes, min_bandwidth_mb_s)
        )
        self._store = open_store(host, port, self.timeout)
        self.host, self.port = host, self._store.port
        self.incarnation = uuid.uuid4().hex[:12]
        self.generation, self.members, self.version = 0, (), None
        self._group, self._last_attempt = None, None
        self.update = 0  # one per broadcast; receivers key updates by it, so a resend is new
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
            "join_timeout_s": self.join_timeout_s,
            "generation": 0,
        }

    def broadcast(
        self, version: int, named_params: NamedTensors | Mapping | None = None
    ) -> SyncStats:
        """Sends the current weights as `version` to every worker that acks in time.

        `named_params` replaces the tensors given at construction for this call
        (e.g. a freshly gathered full state dict). Versions never decrease; the same version
        may be sent again, to reach workers that missed it (each call is a new update).
        Raises `WeightSyncError` (generation abandoned) when a member fails.
        """
        if self._last_attempt is not None and version < self._last_attempt:
            raise ValueError(f"version {version} is below the last one, {self._last_attempt}")
        self._last_attempt = version
        self.update += 1
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
                    prefixed, 0, len(members) + 1, self.device, self.collective_timeout, self.host
                )
                self.members = members
            rendezvous_s = time.perf_counter() - start
            deadline = time.monotonic() + self.collective_timeout.total_seconds()
            works, pack_s = self._pack_and_send(params)
            tick = time.perf_counter()
            checksum = self.buffers.checksum()  # overlaps with the bytes in flight
            checksum_s = time.perf_counter() - tick
            self._publish_expected(version, checksum)
            for work in works:  # one deadline for the whole model (module doc)
                work.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
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
        self.redis.hset(
            self.keys.rendezvous,
            mapping={"pending_version": version, "pending_update": self.update},
        )
        waiting = live_workers(self.redis, self.run_id)
        self._wake(waiting, version)
        ack_key = self.keys.acks(self.incarnation, self.update)
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

    def _pack_and_send(self, params: Mapping[str, torch.Tensor]) -> tuple[list, float]:
        """Packs bucket i+1 while bucket i is on the wire; returns the works and the pack time."""
        works, pack_s = [], 0.0
        for index, flat in enumerate(self.buffers.byte_views):
            tick = time.perf_counter()
            self.buffers.pack_bucket(index, params)
            pack_s += time.perf_counter() - tick
            if self._group is not None:
                works.append(start_broadcast(self._group, flat, self.collective_timeout))
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

    def disagreeing_workers(self, version: int) -> dict[str, str]:
        """Live workers not holding ``version`` bit for bit, with why (see
        ``stale_or_mismatched_workers``)."""
        return stale_or_mismatched_workers(self.redis, self.run_id, version)

    def publish_checkpoint(self, version: int, checkpoint_dir: str) -> None:
        publish_checkpoint(self.redis, self.run_id, version, checkpoint_dir)

    def close(self) -> None:
        """Drops the group and withdraws the rendezvous (workers then wait for a new learner)."""
        self._abandon()
        self.redis.delete(self.keys.rendezvous)
        self._store = None
