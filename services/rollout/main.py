"""Rollout service entry point: engine + weight receiver + loop."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field

from dapo.config import ServiceSettings
from dapo.models import pick_device, resolve_model_dir
from dapo.service import ServiceRuntime
from dapo.weight_receiver import WeightReceiver
from dapo.weightsync import latest_checkpoint
from services.rollout.service import RolloutWorker

log = logging.getLogger(__name__)


class RolloutSettings(ServiceSettings):
    max_prompts: int = Field(8, ge=1)
    """Prompt tasks generated together in one batch (DAPO_MAX_PROMPTS)."""
    max_batch_rows: int = Field(0, ge=0)
    """Cap on prompts x G rows decoded at once (0 = no cap)."""


def build_engine(rt: ServiceRuntime, settings: RolloutSettings, device: str):
    spec = rt.spec
    if spec.rollout.engine == "vllm":
        from services.rollout.vllm_engine import build_vllm_engine  # GPU pods only

        return build_vllm_engine(rt, settings)
    from transformers import AutoTokenizer

    from services.rollout.hf_engine import HFEngine

    model_dir = resolve_model_dir(spec.model, settings.cache_dir)
    start_dir = model_dir
    newest = latest_checkpoint(rt.client, rt.run_id)
    if newest is not None and Path(newest[1]).is_dir():
        start_dir = Path(newest[1])  # joined late: start from the newest weights
        log.info("joining late: loading checkpoint %s (version %d)", start_dir, newest[0])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    engine = HFEngine(
        str(start_dir), tokenizer, device=device, max_batch_size=settings.max_batch_rows or None
    )
    return engine, (newest[0] if newest and start_dir != model_dir else 0)


def run(settings: RolloutSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with ServiceRuntime("rollout", settings) as rt:
        device = pick_device(settings.device)
        engine, version = build_engine(rt, settings, device)
        receiver = WeightReceiver(
            rt.client,
            rt.run_id,
            rt.worker_id,
            list(engine.named_parameters()),
            device=device,
            load_fn=engine.load_weights,
            version=version,
        )
        receiver.join()
        try:
            RolloutWorker(
                rt,
                engine,
                receiver,
                rt.spec.rollout.engine,
                version=version,
                max_prompts=settings.max_prompts,
            ).serve()
        finally:
            receiver.close()


def main() -> int:
    run(RolloutSettings.from_env())
    return 0
