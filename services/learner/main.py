"""Learner service entry point: model, optimizer, weight sender, loop."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from pydantic import Field

from dapo.data.models import load_tokenizer, pick_device, resolve_model_dir
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from dapo.weights.sender import WeightSender
from services.learner.checkpoint import newest_checkpoint, read_optimizer_state, read_trainer_state
from services.learner.distributed import (
    LeaderSender,
    LeaderTrainer,
    Ranks,
    checkpoint_world_size,
    follow,
    init_ranks,
    leader_save,
    load_local_optimizer_state,
    meta_params,
    read_sharded_optimizer_state,
    shard_model,
    world_size,
)
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


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def serve(rt, trainer, tokenizer, sender, run_dir, step, ckpt, settings, **loop_options) -> None:
    """The learner loop, one or many ranks alike: announce where a late worker starts, send
    the current weights so every worker starts in agreement, then train."""
    loop = LearnerLoop(
        rt,
        trainer,
        tokenizer,
        sender,
        run_dir,
        step,
        keep_checkpoints=settings.keep_checkpoints,
        last_ckpt=ckpt,
        **loop_options,
    )
    if ckpt is not None:
        sender.publish_checkpoint(trainer.version, str(ckpt))
    loop.broadcast()
    loop.serve()


def run(settings: LearnerSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if world_size() > 1:  # torchrun --nproc_per_node=N: FSDP-sharded over N ranks
        run_sharded(settings)
        return
    with ServiceRuntime("learner", settings) as rt:
        ctx = rt.ctx
        spec, device = ctx.spec, pick_device(settings.device)
        run_dir = Path(spec.trainer.runs_dir) / ctx.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(spec.data.seed)
        model, ref, ckpt = load_model(spec, settings, run_dir, device)
        tokenizer = load_tokenizer(spec.model, settings.cache_dir)
        pad_id = pad_token_id(tokenizer)
        trainer = Trainer(model, spec, device, pad_id, ref_model=ref)
        step = 0
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            if checkpoint_world_size(ckpt, state) != 1:
                raise RuntimeError(
                    f"checkpoint {ckpt} holds optimizer shards of {state['world_size']} ranks: "
                    f"resume with torchrun --nproc_per_node={state['world_size']}"
                )
            trainer.load_state(state, read_optimizer_state(ckpt))
            step = int(state["step"])
            log.info("resumed from %s: step %d, version %d", ckpt, step, trainer.version)
        sender = WeightSender(
            rt.client,
            ctx.run_id,
            list(model.named_parameters()),
            device=device,
            host=settings.sync_host,
            port=settings.sync_port,
        )
        try:
            serve(ctx, trainer, tokenizer, sender, run_dir, step, ckpt, settings)
        finally:
            sender.close()


def main() -> int:
    run(LearnerSettings.from_env())
    return 0


def build_sharded(spec, settings, ckpt: Path | None, pad_id: int, ranks: Ranks):
    """Every rank: the model (newest checkpoint or base) sharded with FSDP2, its trainer, and
    the step to resume at."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.data.seed)
    base = resolve_model_dir(spec.model, settings.cache_dir)
    dtype = getattr(torch, spec.model.dtype)
    source = str(ckpt or base)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(ranks.device)
    shard_model(model)
    ref = None
    if spec.actor.use_kl_loss:
        ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(ranks.device)
        ref.eval().requires_grad_(False)
        shard_model(ref)
    trainer = Trainer(model, spec, ranks.device, pad_id, ref_model=ref, ranks=ranks)
    if ckpt is None:
        return trainer, 0
    state = read_trainer_state(ckpt)
    load_local_optimizer_state(trainer.optimizer, read_sharded_optimizer_state(ckpt, state, ranks))
    trainer.load_state(state, None)
    return trainer, int(state["step"])


def lead(settings: LearnerSettings, ranks: Ranks) -> None:
    """Rank 0: the service shell around the sharded trainer."""
    started = False
    try:
        with ServiceRuntime("learner", settings) as rt:
            ctx = rt.ctx
            spec = ctx.spec
            run_dir = Path(spec.trainer.runs_dir) / ctx.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt = newest_checkpoint(run_dir / "checkpoints")
            tokenizer = load_tokenizer(spec.model, settings.cache_dir)  # prepares the model dir
            pad_id = pad_token_id(tokenizer)
            ranks.send("init", spec, ckpt, pad_id)
            started = True
            trainer, step = build_sharded(spec, settings, ckpt, pad_id, ranks)
            if ckpt is not None:
                log.info("resumed from %s: step %d, version %d", ckpt, step, trainer.version)
            sender = WeightSender(
                rt.client,
                ctx.run_id,
                meta_params(trainer.model),
                device=ranks.device,
                host=settings.sync_host,
                port=settings.sync_port,
                share_storage=False,
            )
            try:
                serve(
                    ctx,
                    LeaderTrainer(trainer, ranks),
                    tokenizer,
                    LeaderSender(sender, trainer.model, ranks),
                    run_dir,
                    step,
                    ckpt,
                    settings,
                    save=leader_save(ranks),
                )
            finally:
                sender.close()
        ranks.send("stop")
    except BaseException:
        if not started:  # the other ranks wait for "init" on no collective: release them
            ranks.send("stop")
        raise  # after "init", torchrun tears the other ranks down when this one fails


def run_sharded(settings: LearnerSettings) -> None:
    import torch.distributed as dist

    ranks = init_ranks(settings.device)
    log.info("learner rank %d of %d on %s", ranks.rank, ranks.world, ranks.device)
    try:
        if ranks.rank == 0:
            lead(settings, ranks)
            return
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop
            signal.signal(sig, signal.SIG_IGN)
        kind, *args = ranks.receive()
        if kind == "stop":
            return
        spec, ckpt, pad_id = args
        trainer, _ = build_sharded(spec, settings, ckpt, pad_id, ranks)
        follow(ranks, trainer)
    finally:
        dist.destroy_process_group()
