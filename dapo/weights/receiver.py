"""Rollout side of the weight sync: `WeightReceiver` (protocol in `dapo.weights`)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta

import redis
import torch
import torch.distributed as dist

from dapo.weights.buckets import (
    BucketLayout,
    FlatBuffers,
    NamedTensors,
    RowDigest,
    drop_group,
    is_loopback,
    make_group,
    start_broadcast,
)
from dapo.weights.registry import (
    KEY_TTL_S,
    CheckpointRef,
    LayoutMismatchError,
    WeightKeys,
    WeightSyncError,
    _text,
    check_sync_address,
    needs_checkpoint,
)
from dapo.weights.stream import StagingPool, receive_buckets, stage_buckets

log = logging.getLogger(__name__)


class WeightReceiver:
    """Rollout side: receives updates into flat buffers and hands views to `load_fn`.

    `params`: the engine's (name, tensor) list (meta tensors work; names and
    shapes are checked against the learner's, dtypes follow the learner's) or
    a ready `BucketLayout`. `load_fn(named_views)` must copy: the views are
    overwritten by the next update. `state_fn()`, if given, returns the
    engine's current (name, tensor) list; the reported checksum is then taken
    over those tensors (cast to the learner's dtypes) instead of the received
    buffers, so it proves what the engine actually holds. `version` is the
    version of the weights the engine starts with (-1: unknown). The learner's store
    address read from Redis must be one of `allowed_hosts` (`check_sync_address`; empty =
    loopback only) and a checkpoint announced there must lie under `checkpoint_root`
    (`check_checkpoint_dir`), else `AddressRefused`: Redis is not trusted to steer workers.

    `stream`: hold `depth` bucket buffers instead of a whole model in the wire dtype, and
    call `load_fn` once per update with a one-pass iterator whose views are valid only
    until it moves to the next bucket (`stream.receive_buckets`), so `load_fn` must copy
    each tensor as it reads it (``HFEngine.load_weights`` does; an engine that collects
    the whole list first, like vLLM's layer-wise reload, needs `stream=False`).
    """

    def __init__(
        self,
        redis_client,
        run_id: str,
        worker_id: str,
        params: BucketLayout | NamedTensors,
        load_fn: Callable[[list[tuple[str, torch.Tensor]]], None],
        device: torch.device | str = "cpu",
        host: str | None = None,
        state_fn: Callable[[], NamedTensors] | None = None,
        liveness_s: float = 15.0,
        version: int = -1,
        allowed_hosts: Sequence[str] = (),
        checkpoint_root: str | os.PathLike | None = None,
        stream: bool = False,
        depth: int = 2,
    ) -> None:
        self.redis, self.keys, self.run_id = redis_client, WeightKeys(run_id), run_id
        self.worker_id, self.device, self.host = worker_id, torch.device(device), host
        self._params, self.load_fn, self.state_fn = params, load_fn, state_fn
        self.liveness_s, self.version = liveness_s, version
        self.allowed_hosts, self.checkpoint_root = tuple(allowed_hosts), checkpoint_root
        self.layout: BucketLayout | None = params if isinstance(params, BucketLayout) else None
        self.stream, self.depth = stream, depth
        self.buffers: FlatBuffers | None = None  # whole-model buffers (stream=False)
        self.pool: StagingPool | None = None  # a few bucket buffers (stream=True)
        self._rendezvous: dict[str, str] = {}
        self._seen: tuple[str, int] | None = None  # last (incarnation, update) acked
        # this process's identity: a restart under the same worker id is a new member
        self.session = uuid.uuid4().hex[:12]
        self._group, self._group_id, self._store, self._store_id = None, None, None, None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def join(self, wait_s: float = 60.0) -> None:
        """Waits for the learner's rendezvous, checks the layout, registers, starts the heartbeat."""
        deadline = time.monotonic() + wait_s
        while not (fields := self._read_rendezvous()).get("incarnation"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no weight-sync rendezvous at {self.keys.rendezvous}")
            time.sleep(0.1)
        self._adopt_layout(fields)
        check_sync_address(fields["host"], fields["port"], self.allowed_hosts)  # fail early
        # an update in progress is NOT marked seen: the learner counts a live worker (also
        # one restarted under the same id) as a member-to-be and waits for its ack
        self._seen = None
        self._register()
        self._heartbeat = threading.Thread(target=self._beat, name="weights-heartbeat", daemon=True)
        self._heartbeat.start()

    def _read_rendezvous(self) -> dict[str, str]:
        raw = self.redis.hgetall(self.keys.rendezvous)
        return {_text(k): _text(v) for k, v in raw.items()}

    def _adopt_layout(self, fields: dict[str, str]) -> None:
        if self.layout is None:
            learner = BucketLayout.from_json(fields["layout"])
            if problems := learner.mismatches(self._params):
                raise LayoutMismatchError(
                    f"worker {self.worker_id!r}: the model does not match the learner's "
                    f"({fields['summary']}): {'; '.join(problems)}"
                )
            self.layout = learner
        if self.layout.fingerprint != fields["fingerprint"]:
            raise LayoutMismatchError(
                f"worker {self.worker_id!r}: layout fingerprint {self.layout.fingerprint} "
                f"({self.layout.summary()}) differs from the learner's {fields['fingerprint']} "
                f"({fields['summary']})"
            )
        if self.buffers is None and self.pool is None:
            if self.stream:
                self.pool = StagingPool(self.layout, self.device)
            else:
                self.buffers = FlatBuffers(self.layout, self.device)
        self._rendezvous = fields

    def _register(self) -> None:
        pipe = self.redis.pipeline()
        entry = json.dumps({"fingerprint": self.layout.fingerprint})
        pipe.hset(self.keys.workers, self.worker_id, entry)
        pipe.set(self.keys.alive(self.worker_id), 1, px=int(self.liveness_s * 1000))
        pipe.execute()

    def _beat(self) -> None:
        """Keeps this worker live; a Redis outage skips beats (logged once) instead of ending
        the thread, which would leave the worker out of every later update."""
        failing = False
        while not self._stop.wait(self.liveness_s / 3):
            try:
                self._register()
            except redis.RedisError as exc:
                if not failing:
                    log.warning("weights heartbeat failed (will keep trying): %s", exc)
                failing = True
            else:
                failing = False

    def poll(self, timeout_s: float = 0.0) -> int | None:
        """Takes part in a pending update, if any: returns the new version, else None.

        With `timeout_s` 0, one Redis round trip when no update is pending, cheap
        enough to call between two decode steps; with `timeout_s` > 0, blocks up to
        that long for an update to start.
        Raises `WeightSyncError` if the collective fails (the next update
        forms a new generation) and `LayoutMismatchError` if the learner now
        runs another model.
        """
        if self.layout is None or (self.buffers is None and self.pool is None):
            raise RuntimeError("WeightReceiver.poll before join()")
        deadline = time.monotonic() + timeout_s
        while True:
            incarnation, update, version = self.redis.hmget(
                self.keys.rendezvous, ["incarnation", "pending_update", "pending_version"]
            )
            if incarnation is not None and update is not None and version is not None:
                key = (_text(incarnation), int(update))
                if key != self._seen:
                    self._seen = key
                    return self._take(*key, int(version))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.redis.blpop([self.keys.inbox(self.worker_id)], timeout=min(remaining, 1.0))

    def _take(self, incarnation: str, update: int, version: int) -> int | None:
        """Steps 2, 4 and 5 of the protocol for one update."""
        self.redis.delete(self.keys.inbox(self.worker_id))
        ack_key = self.keys.acks(incarnation, update)
        ack = {
            "worker_id": self.worker_id,
            "fingerprint": self.layout.fingerprint,
            "session": self.session,
        }
        self.redis.pipeline().rpush(ack_key, json.dumps(ack)).expire(ack_key, KEY_TTL_S).execute()
        plan = self._await_plan(incarnation, update)
        if plan is None or self.worker_id not in plan["members"]:
            return None  # too late for this update; the next one includes us
        try:
            self._ensure_group(plan)
            checksum = self._receive(self._collective_timeout())
        except RuntimeError as error:
            self._leave_group()
            if self.pool is not None:  # a failed op may still hold a buffer: never reuse them
                self.pool = StagingPool(self.layout, self.device)
            raise WeightSyncError(
                f"worker {self.worker_id!r}: receiving version {version} in generation "
                f"{plan['generation']} failed; generation abandoned: {error}"
            ) from error
        self._report(version, checksum)
        return version

    def _receive(self, timeout: timedelta) -> str:
        """Step 5: the buckets into `load_fn`, whole (one call with views of the full buffers)
        or streamed (one call with a one-pass stream of views, `depth` buckets ahead); the
        checksum of what arrived. Waits on each bucket as long as the learner may take for
        the whole model, never less."""
        if not self.stream:
            works = [start_broadcast(self._group, f, timeout) for f in self.buffers.byte_views]
            for work in works:
                work.wait(timeout)
            self.load_fn(self.buffers.views())
            return self.buffers.checksum()
        digest = RowDigest()
        views = receive_buckets(
            self.layout, self._group, self.pool, lambda _: timeout, digest, self.depth
        )
        try:
            self.load_fn(views)
            for _ in views:  # buckets load_fn left unread must still be received
                pass
        finally:
            views.close()
        return digest.hexdigest()

    def _timeout(self) -> timedelta:
        return timedelta(seconds=float(self._rendezvous["timeout_s"]))

    def _collective_timeout(self) -> timedelta:
        """The learner's bound on building a group and on one transfer (``dapo.weights.sender``);
        a rendezvous of a learner that predates it has only ``timeout_s``."""
        rv = self._rendezvous
        return timedelta(seconds=float(rv.get("collective_timeout_s") or rv["timeout_s"]))

    def _await_plan(self, incarnation: str, update: int) -> dict | None:
        """Waits for the learner's plan for `update`; None if the learner moved on or vanished."""
        rv = self._rendezvous
        wait_s = float(rv["join_timeout_s"]) + float(rv["timeout_s"])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            raw, current, pending = self.redis.hmget(
                self.keys.rendezvous, ["plan", "incarnation", "pending_update"]
            )
            plan = json.loads(raw) if raw else None
            if plan and plan["incarnation"] == incarnation and plan.get("update") == update:
                return plan
            if _text(current) != incarnation or (pending is not None and int(pending) > update):
                return None
            self.redis.blpop([self.keys.inbox(self.worker_id)], timeout=0.25)
        return None

    def _ensure_group(self, plan: dict) -> None:
        """Builds the plan's generation group unless already in it."""
        group_id = (plan["incarnation"], plan["generation"])
        if group_id == self._group_id:
            return
        self._leave_group()
        if plan["incarnation"] != self._rendezvous["incarnation"]:
            self._adopt_layout(self._read_rendezvous())  # a restarted learner
        if plan["fingerprint"] != self.layout.fingerprint:
            raise LayoutMismatchError(
                f"worker {self.worker_id!r}: the learner's plan uses layout {plan['fingerprint']}, "
                f"this worker {self.layout.fingerprint}"
            )
        rv = self._rendezvous
        if self._store_id != rv["incarnation"]:
            store_host, store_port = check_sync_address(rv["host"], rv["port"], self.allowed_hosts)
            self._store = dist.TCPStore(
                store_host, store_port, is_master=False, wait_for_workers=False,
                timeout=self._timeout(),
            )  # fmt: skip
            self._store_id = rv["incarnation"]
        host = self.host
        if host is None and is_loopback(rv["host"]):
            host = "127.0.0.1"  # learner on this machine: stay on loopback
        prefixed = dist.PrefixStore(f"gen{plan['generation']}", self._store)
        rank, size = plan["members"].index(self.worker_id) + 1, len(plan["members"]) + 1
        self._group = make_group(
            prefixed, rank, size, self.device, self._collective_timeout(), host
        )
        self._group_id = group_id

    def _leave_group(self) -> None:
        drop_group(self._group, self.device)
        self._group, self._group_id = None, None

    def _report(self, version: int | None = None, received: str | None = None) -> None:
        """Publishes version + checksum: of the engine's tensors when `state_fn` is set (cast
        to the layout's dtypes, bucket by bucket), else `received`."""
        checksum = received
        if self.state_fn is not None:
            checksum = self._engine_checksum()
        self.version = self.version if version is None else version
        report = {"version": self.version, "checksum": checksum, "time": time.time()}
        self.redis.hset(self.keys.reports, self.worker_id, json.dumps(report))

    def _engine_checksum(self) -> str:
        state = dict(self.state_fn())
        if not self.stream:  # the buffers are free until the next update
            self.buffers.pack(state, cast=True)
            return self.buffers.checksum()
        digest = RowDigest()
        for _, flat in stage_buckets(self.layout, state, self.pool):
            digest.update(flat)
            self.pool.release(flat)
        return digest.hexdigest()

    @property
    def group(self):
        """The current generation's process group (None between generations)."""
        return self._group

    def needs_checkpoint(self) -> CheckpointRef | None:
        """The newest checkpoint if it is newer than the weights held (see `set_version`)."""
        return needs_checkpoint(self.redis, self.run_id, self.version, self.checkpoint_root)

    def set_version(self, version: int) -> None:
        """Records that the engine now holds `version` (e.g. loaded from a checkpoint).

        Reported with a checksum if `state_fn` is set, else without one.
        """
        self.version = version
        if self.state_fn is not None and self.layout is not None:
            self._report()
        else:
            report = {"version": version, "checksum": None, "time": time.time()}
            self.redis.hset(self.keys.reports, self.worker_id, json.dumps(report))

    def close(self) -> None:
        """Stops the heartbeat, deregisters and leaves the group."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        pipe = self.redis.pipeline()
        pipe.hdel(self.keys.workers, self.worker_id)
        pipe.delete(self.keys.alive(self.worker_id), self.keys.inbox(self.worker_id))
        pipe.hdel(self.keys.reports, self.worker_id)
        pipe.execute()
        self._leave_group()
        self._store = self._store_id = None
