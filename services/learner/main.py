"""Learner service entry point: one start-up path for a plain process and for torchrun.

A plain process is a world of one; ``torchrun --nproc_per_node=N`` makes N
ranks over which the model is sharded (``services.learner.distributed``).
Either way rank 0 runs the service shell and the loop (``lead``) and every
other rank carries out its commands (``follow``); ``build_policy`` gives each
rank its model, trainer and resume point.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import Field

from dapo.data.models import load_tokenizer, pick_device
from dapo.runtime.config import ConfigError, ServiceSettings
from dapo.runtime.lease import Lease
from dapo.runtime.service import ServiceContext, ServiceRuntime
from dapo.tracking import Trackers, TrackerUnavailable, TrackingRun, open_trackers
from dapo.weights.sender import WeightSender
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
    """One rank: the sender adopts the parameters' storage, so a broadcast packs nothing.
    Sharded: rank 0 holds only shards, so the sender gets the full layout (meta tensors)
    and each broadcast the gathered full parameters."""
    model, ranks = policy.trainer.model, policy.ranks
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
                    LearnerLoop(
                        ctx,
                        policy,
                        tokenizer,
                        sender,
                        run_dir,
                        step,
                        keep_checkpoints=settings.keep_checkpoints,
                        last_ckpt=ckpt,
                        trackers=trackers,
                    ).run()
            finally:
                sender.close()
        ranks.send("stop")
    except BaseException:
        if not started:  # the other ranks wait for "init" on no collective: release them
            ranks.send("stop")
        raise  # after "init", torchrun tears the other ranks down when this one fails


def follow(settings: LearnerSettings, ranks: Ranks) -> None:
    """Ranks > 0: build the same policy as rank 0, then carry out its commands."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    kind, *args = ranks.receive()
    if kind == "stop":
        return
    spec, ckpt, pad_id = args
    policy, _ = build_policy(spec, settings.cache_dir, ckpt, pad_id, ranks)
    policy.follow()


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
