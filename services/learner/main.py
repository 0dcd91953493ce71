"""Learner service entry point: one start-up path for a plain process and for torchrun.

A plain process is a world of one; ``torchrun --nproc_per_node=N`` makes N
ranks over which the model is sharded (``services.learner.distributed``).
Either way rank 0 runs the service shell and the loop (``lead``) and every
other rank carries out its commands (``follow``); ``build_policy`` gives each
rank its model, trainer and resume point.

Health of a multi-node learner: every pod (torchrun node) answers its probes on
``DAPO_HEALTH_PORT``. The pod holding rank 0 answers from the service shell;
on every other pod the process with ``LOCAL_RANK`` 0 serves ``/healthz``,
``/readyz`` and ``/metrics`` itself (``follower_health``), from a thread that
answers while the rank is blocked in a collective or waits hours for a
command. A rank that dies is not left to the probes: torchrun's agent tears
down every local rank of its node and exits, so the pod's container restarts,
and the other nodes' collectives fail and take their ranks down the same way.
A rank that hangs inside a collective is caught by the collective's timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from prometheus_client import CollectorRegistry, Gauge
from pydantic import Field

from dapo.data.models import load_tokenizer, pick_device
from dapo.runtime.config import ConfigError, ServiceSettings
from dapo.runtime.health import HealthServer
from dapo.runtime.lease import Lease
from dapo.runtime.service import ServiceContext, ServiceRuntime
from dapo.tracking import Trackers, TrackerUnavailable, TrackingRun, open_trackers
from dapo.weights.sender import WeightSender
from dapo.weights.stream import wire_dtype
from proto.keys import run_key
from proto.runspec import RunSpec
from services.learner.checkpoint import newest_checkpoint
from services.learner.distributed import meta_params
from services.learner.policy import Policy, build_policy
from services.learner.ranks import Ranks, SoloRanks, init_ranks
from services.learner.service import LearnerLoop

log = logging.getLogger(__name__)
LEASE_TTL_S = 15.0
"""How long a learner that stopped renewing keeps the run's learner lease: a restarted learner
waits at most this long for a crashed one's lease to lapse."""


class LearnerSettings(ServiceSettings):
    keep_checkpoints: int = Field(3, ge=0)
    """Newest checkpoints kept on disk (0 = all)."""
    sync_host: str = "127.0.0.1"
    """Address rollout workers reach the learner's weight-sync store on (DAPO_SYNC_HOST)."""
    sync_port: int = Field(0, ge=0, le=65535)
    """Port of the weight-sync store (0 = a free one)."""
    sync_join_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Longest wait for live rollout workers to ack an update; a late one catches up later."""
    sync_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Base allowance of the weight-sync collectives (group set-up, one broadcast)."""
    sync_min_bandwidth_mb_s: float = Field(100.0, gt=0)
    """Slowest rate (MiB/s) a broadcast may crawl at: the collective timeout is
    sync_timeout_s plus the model's bytes at this rate (DAPO_SYNC_MIN_BANDWIDTH_MB_S)."""
    sync_bucket_mb: float = Field(64.0, gt=0, le=4096)
    """Cap of one weight-sync bucket (MiB); each side holds sync_depth (+1) of them."""
    sync_bucket_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Base allowance of one bucket's broadcast; plus its bytes at sync_min_bandwidth_mb_s."""
    sync_depth: int = Field(2, ge=1, le=16)
    """Buckets on the wire at once while the next is gathered and cast."""
    sync_wire_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype weights travel in; auto = rollout.dtype for vLLM, the learner's for HF."""
    sync_double_buffer: bool = False
    """Train the next step while the previous version is on the wire; costs one model in
    the wire dtype on rank 0's device (the snapshot being sent)."""
    world_size: int = Field(1, ge=1, le=65536, validation_alias="WORLD_SIZE")
    """Learner ranks, set by torchrun (WORLD_SIZE); 1 for a plain process."""
    local_rank: int = Field(0, ge=0, le=1024, validation_alias="LOCAL_RANK")
    """This rank's GPU on its node, set by torchrun (LOCAL_RANK)."""


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def join_ranks(settings: LearnerSettings) -> Ranks:
    """The torchrun group when started by torchrun with several ranks, else a world of one
    (no process group is ever initialised)."""
    if settings.world_size > 1:
        return init_ranks(settings.device, settings.local_rank)
    return SoloRanks(pick_device(settings.device))


def open_sender(rt: ServiceRuntime, policy: Policy, settings: LearnerSettings) -> WeightSender:
    """One rank: the sender adopts the parameters' storage, so a broadcast packs nothing
    (unless the wire dtype differs: then it streams). Sharded: rank 0 holds only shards, so
    the sender gets the full layout (meta tensors) and each broadcast streams the gathered
    parameters, one at a time, through a few buckets."""
    model, ranks, spec = policy.trainer.model, policy.ranks, rt.ctx.spec
    sharded = ranks.world > 1
    return WeightSender(
        rt.client,
        rt.ctx.run_id,
        meta_params(model) if sharded else list(model.named_parameters()),
        device=ranks.device,
        host=settings.sync_host,
        port=settings.sync_port,
        timeout_s=settings.sync_timeout_s,
        join_timeout_s=settings.sync_join_timeout_s,
        min_bandwidth_mb_s=settings.sync_min_bandwidth_mb_s,
        share_storage=not sharded,
        bucket_mb=settings.sync_bucket_mb,
        bucket_timeout_s=settings.sync_bucket_timeout_s,
        depth=settings.sync_depth,
        wire_dtype=wire_dtype(settings.sync_wire_dtype, spec.rollout.engine, spec.rollout.dtype),
        double_buffer=settings.sync_double_buffer,
    )


@contextmanager
def hold_learner_lease(rt: ServiceRuntime) -> Iterator[ServiceContext]:
    """One learner per run: take the run's learner lease (waiting while another learner holds
    it) before reading any checkpoint, and fence every write to Redis by it, so a learner
    that lost the lease (a long stall, a second replica) writes nothing more."""
    ctx = rt.ctx
    holder = f"{ctx.worker_id}@{socket.gethostname()}:{os.getpid()}"
    lease = Lease(rt.client, run_key(ctx.run_id, "learner", "lease"), holder, LEASE_TTL_S)
    fence = lease.acquire(stop=ctx.should_stop)
    ctx.bus.fence = fence
    ctx.store.fence = fence
    try:
        yield ctx
    finally:
        lease.release()


@contextmanager
def run_trackers(spec: RunSpec, run_id: str, run_dir: Path) -> Iterator[Trackers]:
    """The dashboards of ``trainer.logger``, closed when the loop ends however it ends (W&B
    and MLflow then mark the run finished). A missing package is a ``ConfigError`` naming
    the extra; a backend that fails later only counts its failures."""
    try:
        trackers = open_trackers(spec.trainer.logger, TrackingRun.of(spec, run_id, run_dir))
    except TrackerUnavailable as exc:
        raise ConfigError(str(exc)) from None
    with trackers:
        yield trackers


def lead(settings: LearnerSettings, ranks: Ranks) -> None:
    """Rank 0: the service shell, the weight sender and the learner loop. The other ranks
    (if any) learn the run from the "init" command and are released by "stop"."""
    started = False
    try:
        with ServiceRuntime("learner", settings) as rt, hold_learner_lease(rt) as ctx:
            spec = ctx.spec
            run_dir = Path(spec.trainer.runs_dir) / ctx.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt = newest_checkpoint(run_dir / "checkpoints")
            tokenizer = load_tokenizer(spec.model, settings.cache_dir)  # prepares the model dir
            pad_id = pad_token_id(tokenizer)
            ranks.send("init", spec, ckpt, pad_id)
            started = True
            policy, step = build_policy(spec, settings.cache_dir, ckpt, pad_id, ranks)
            if ckpt is not None:
                log.info("resumed from %s: step %d, version %d", ckpt, step, policy.version)
            sender = open_sender(rt, policy, settings)
            try:
                with run_trackers(spec, ctx.run_id, run_dir) as trackers:
                    loop = LearnerLoop(
                        ctx,
                        policy,
                        tokenizer,
                        sender,
                        run_dir,
                        step,
                        keep_checkpoints=settings.keep_checkpoints,
                        last_ckpt=ckpt,
                        trackers=trackers,
                    )
                    # entered again after a Redis outage: records its step, sends its weights
                    # again, then trains on; its bus keeps the batches held for a checkpoint
                    rt.serve(loop.run, fresh_bus=False)
            finally:
                sender.close()
        ranks.send("stop")
    except BaseException:
        if not started:  # the other ranks wait for "init" on no collective: release them
            ranks.send("stop")
        raise  # after "init", torchrun tears the other ranks down when this one fails


FOLLOWING = "following rank 0"
"""A follower's phase once it holds its shards: the only one in which it is ready."""


class FollowerHealth:
    """The probes of a pod whose ranks are all > 0: alive while the process is, ready once
    the rank holds its shards and follows rank 0's commands."""

    def __init__(self, settings: LearnerSettings, ranks: Ranks) -> None:
        self.phase = "waiting for rank 0"
        registry = CollectorRegistry()
        labels = {"rank": str(ranks.rank), "world": str(ranks.world)}
        Gauge(
            "dapo_learner_rank_up",
            "1 while this learner rank runs",
            list(labels),
            registry=registry,
        ).labels(**labels).set(1)
        self._ready = Gauge(
            "dapo_learner_rank_ready",
            "1 once this rank follows rank 0",
            list(labels),
            registry=registry,
        ).labels(**labels)
        self.server = HealthServer(
            registry, self._readiness, settings.health_host, settings.health_port
        ).start()
        log.info("learner rank %d serves health on :%d", ranks.rank, self.server.port)

    def _readiness(self) -> tuple[bool, str]:
        return self.phase == FOLLOWING, self.phase

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._ready.set(1.0 if phase == FOLLOWING else 0.0)

    def stop(self) -> None:
        self.server.stop()


def follower_health(settings: LearnerSettings, ranks: Ranks) -> FollowerHealth | None:
    """The pod's health endpoints from a rank > 0 with ``LOCAL_RANK`` 0 (the first rank of
    a torchrun node that does not hold rank 0); None for the others, whose pod is answered
    for by rank 0 or by that first rank (one port per pod)."""
    if ranks.rank == 0 or settings.local_rank != 0:
        return None
    return FollowerHealth(settings, ranks)


def follow(settings: LearnerSettings, ranks: Ranks) -> None:
    """Ranks > 0: build the same policy as rank 0, then carry out its commands."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    health = follower_health(settings, ranks)
    try:
        kind, *args = ranks.receive()
        if kind == "stop":
            return
        spec, ckpt, pad_id = args
        if health:
            health.set_phase("building the model")
        policy, _ = build_policy(spec, settings.cache_dir, ckpt, pad_id, ranks)
        if health:
            health.set_phase(FOLLOWING)
        policy.follow()
    finally:
        if health:
            health.stop()


def run(settings: LearnerSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ranks = join_ranks(settings)
    log.info("learner rank %d of %d on %s", ranks.rank, ranks.world, ranks.device)
    try:
        if ranks.rank == 0:
            lead(settings, ranks)
        else:
            follow(settings, ranks)
    finally:
        ranks.close()


def main() -> int:
    run(LearnerSettings.from_env())
    return 0
