"""Learner service entry point: model, optimizer, weight sender, loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from pydantic import Field

from dapo.config import ServiceSettings
from dapo.models import load_tokenizer, pick_device, resolve_model_dir
from dapo.service import ServiceRuntime
from dapo.weightsync import WeightSender
from services.learner.checkpoint import newest_checkpoint, read_optimizer_state, read_trainer_state
from services.learner.service import LearnerLoop
from services.learner.trainer import Trainer

log = logging.getLogger(__name__)


class LearnerSettings(ServiceSettings):
    keep_checkpoints: int = Field(3, ge=0)
    """Newest checkpoints kept on disk (0 = all)."""
    sync_host: str = "127.0.0.1"
    """Address rollout workers reach the learner's weight-sync store on (DAPO_SYNC_HOST)."""
    sync_port: int = Field(0, ge=0, le=65535)
    """Port of the weight-sync store (0 = a free one)."""


def load_model(spec, settings, run_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    ckpt = newest_checkpoint(run_dir / "checkpoints")
    source = ckpt or resolve_model_dir(spec.model, settings.cache_dir)
    dtype = getattr(torch, spec.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).to(device)
    ref = None
    if spec.actor.use_kl_loss:
        base = resolve_model_dir(spec.model, settings.cache_dir)
        ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device).eval()
        ref.requires_grad_(False)
    return model, ref, ckpt


def check_single_process() -> None:
    """Sharding the learner across GPUs (FSDP under torchrun) is not implemented: refuse a
    multi-process launch clearly instead of starting several uncoordinated learners."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise SystemExit(
            f"the learner runs as one process (WORLD_SIZE={world}); multi-GPU FSDP is not "
            "supported yet: launch it with --nproc_per_node=1 (Helm: learner.gpus: 1)"
        )


def run(settings: LearnerSettings) -> None:
    check_single_process()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with ServiceRuntime("learner", settings) as rt:
        spec, device = rt.spec, pick_device(settings.device)
        run_dir = Path(spec.trainer.runs_dir) / rt.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(spec.data.seed)
        model, ref, ckpt = load_model(spec, settings, run_dir, device)
        tokenizer = load_tokenizer(spec.model, settings.cache_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainer = Trainer(model, spec, device, pad_id, ref_model=ref)
        step = 0
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            trainer.load_state(state, read_optimizer_state(ckpt))
            step = int(state["step"])
            log.info("resumed from %s: step %d, version %d", ckpt, step, trainer.version)
        sender = WeightSender(
            rt.client,
            rt.run_id,
            list(model.named_parameters()),
            device=device,
            host=settings.sync_host,
            port=settings.sync_port,
        )
        try:
            loop = LearnerLoop(
                rt,
                trainer,
                tokenizer,
                sender,
                run_dir,
                step,
                keep_checkpoints=settings.keep_checkpoints,
                last_ckpt=ckpt,
            )
            loop._ckpt_step = step if ckpt is not None else -1
            if ckpt is not None:
                sender.publish_checkpoint(trainer.version, str(ckpt))
            loop.broadcast()  # resumed or initial weights: every worker starts in agreement
            loop.serve()
        finally:
            sender.close()


def main() -> int:
    run(LearnerSettings.from_env())
    return 0
