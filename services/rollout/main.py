"""Rollout service entry point: engine + weight receiver + loop."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from pydantic import Field, field_validator

from dapo.data.models import load_tokenizer, pick_device, resolve_model_dir
from dapo.engines.vllm_settings import VLLMSettings
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import latest_checkpoint
from proto.runspec import RunSpec
from services.rollout.service import RolloutWorker

log = logging.getLogger(__name__)


class RolloutSettings(ServiceSettings):
    max_prompts: int = Field(8, ge=1)
    """Prompt tasks generated together in one batch (DAPO_MAX_PROMPTS)."""
    max_batch_rows: int = Field(0, ge=0)
    """Cap on prompts x G rows decoded at once (0 = no cap)."""
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    """vLLM knobs (DAPO_VLLM_* variables), used when the run spec says rollout.engine: vllm."""
    sync_allowed_hosts: str = ""
    """Weight-sync hosts accepted from Redis: comma-separated hosts, addresses or DNS suffixes
    with a leading dot (DAPO_SYNC_ALLOWED_HOSTS); empty = loopback only."""

    @field_validator("sync_allowed_hosts")
    @classmethod
    def _hosts_are_names(cls, value: str) -> str:
        """A typo here would silently refuse the real learner: reject what is no host name."""
        for entry in cls.split_hosts(value):
            if not _HOST.fullmatch(entry):
                raise ValueError(f"{entry!r} is not a host, address or .dns.suffix")
        return value

    @staticmethod
    def split_hosts(value: str) -> tuple[str, ...]:
        return tuple(e.strip() for e in value.split(",") if e.strip())

    def allowed_hosts(self) -> tuple[str, ...]:
        """``sync_allowed_hosts`` as a tuple (``check_sync_address`` takes it)."""
        return self.split_hosts(self.sync_allowed_hosts)


_HOST = re.compile(r"\.?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")
"""A host name, an IPv4 address, a DNS suffix with a leading dot, or an IPv6 address."""


def checkpoint_root(spec: RunSpec, run_id: str) -> Path:
    """Where the learner of ``run_id`` writes checkpoints: the only place a worker loads
    weights from when Redis names a checkpoint (``check_checkpoint_dir``)."""
    return Path(spec.trainer.runs_dir) / run_id / "checkpoints"


def start_weights(rt: ServiceRuntime, model_dir: Path) -> tuple[Path, int]:
    """Where the engine loads its first weights from, and their version: the base model, or
    the newest checkpoint for a worker joining a run that has moved on."""
    newest = latest_checkpoint(
        rt.client, rt.ctx.run_id, checkpoint_root(rt.ctx.spec, rt.ctx.run_id)
    )
    if newest is None or not Path(newest.checkpoint_dir).is_dir():
        return model_dir, 0
    log.info(
        "joining late: loading checkpoint %s (version %d)", newest.checkpoint_dir, newest.version
    )
    return Path(newest.checkpoint_dir), newest.version


def build_engine(rt: ServiceRuntime, settings: RolloutSettings, device: str):
    """The run's rollout engine and the version of the weights it starts with. vLLM (on a
    GPU, or its CPU build) is imported only when the run asks for it; ``max_batch_rows``
    caps the rows decoded together in either engine."""
    spec = rt.ctx.spec
    model_dir = resolve_model_dir(spec.model, settings.cache_dir)
    start_dir, version = start_weights(rt, model_dir)
    rows = settings.max_batch_rows or None
    tokenizer = load_tokenizer(spec.model, settings.cache_dir)  # local files only
    if spec.rollout.engine == "vllm":
        from dapo.engines.vllm import build_vllm_engine

        engine = build_vllm_engine(
            spec, model_dir, start_dir, tokenizer, settings.vllm, max_num_seqs=rows
        )
        return engine, version
    from dapo.engines.hf import HFEngine

    engine = HFEngine(str(start_dir), tokenizer, device=device, max_batch_size=rows)
    return engine, version


def run(settings: RolloutSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with ServiceRuntime("rollout", settings) as rt:
        ctx = rt.ctx
        device = pick_device(settings.device)
        engine, version = build_engine(rt, settings, device)
        receiver = WeightReceiver(
            rt.client,
            ctx.run_id,
            ctx.worker_id,
            list(engine.named_parameters()),
            device=device,
            load_fn=engine.load_weights,
            version=version,
            allowed_hosts=settings.allowed_hosts(),
            checkpoint_root=checkpoint_root(ctx.spec, ctx.run_id),
            # HF copies each tensor as it reads it: a few buckets, not a model; vLLM's
            # layer-wise reload takes whole layers at once
            stream=ctx.spec.rollout.engine == "hf",
        )
        receiver.join()
        try:
            worker = RolloutWorker(
                ctx,
                engine,
                receiver,
                ctx.spec.rollout.engine,
                version=version,
                max_prompts=settings.max_prompts,
            )
            rt.serve(worker.serve)
        finally:
            receiver.close()


def main() -> int:
    run(RolloutSettings.from_env())
    return 0
