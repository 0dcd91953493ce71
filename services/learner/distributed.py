"""The learner sharded across ranks with FSDP2 (``torchrun --nproc_per_node=N``).

One start-up path serves every world size (``services.learner.main``): a
plain process is a world of one (``SoloRanks``: no process group, collectives
are identities), so the model is loaded plainly and not sharded, the sender
adopts its parameters and checkpoints are plain files
(``services.learner.checkpoint``).

With ``WORLD_SIZE > 1`` (``GroupRanks``; backend NCCL on CUDA, gloo on CPU,
same code):

- the model is built on the ``meta`` device, ``fully_shard`` wraps each decoder
  layer and then the root, every rank materialises only its own shards and rank
  0 alone reads the weight files and broadcasts them tensor by tensor
  (``services.learner.model_init``), so no rank ever holds the whole model.
  Parameters, gradients and optimizer state are split over ranks and stay in
  ``model.dtype``; with bf16 mixed precision each layer's parameters are
  gathered in bf16 for compute and gradients reduced in float32. Gradients are
  reduced as a *sum* (divide factor 1, plain SUM collectives: gloo has no
  PREMUL_SUM), not a mean;
- rank 0 alone runs the service shell (health port, heartbeat, bus, weight
  sender, checkpoints, metrics). Its ``Policy`` (``services.learner.policy``)
  sends each command to the other ranks before doing its own part; they run
  ``Policy.follow``: they wait for commands from rank 0 on a gloo side group
  with a long timeout (the learner may idle for hours between batches), then
  join the collectives the command implies. Commands: ``("init", spec, ckpt,
  pad_id)`` (build the model; sent once, at start), ``("batch", fields)`` (a
  codec-encoded TrainingBatch), ``("weights",)`` (gather full parameters for
  the rollout broadcast), ``("checkpoint", root, step)`` and ``("stop",)``.
  Followers ignore SIGTERM: rank 0 sees it, writes the final checkpoint with
  them, then sends stop; rank 0 also sends stop when it fails before "init"
  (after it, torchrun tears the other ranks down);
- every rank holds the whole batch, so mini-batch loss normalisers are the
  same everywhere. Micro-batches are dealt round-robin over ranks
  (``padded_share``); ranks short of one run a dummy forward/backward with a
  zero loss so all ranks issue the same FSDP collectives. Since each rank's
  loss is normalised by the whole mini-batch and gradients are summed, the
  update equals the single-process one. The mini-batch loss is all-reduced
  before the skip test, and ``clip_grad_norm_`` on DTensors gives the global
  norm, so every rank takes the same step-or-skip decision;
- fixed (old / reference) log-probs: each rank computes its own micro-batches
  into a zero (B, T) tensor and a sum all-reduce completes it everywhere;
- weights for rollout workers: ``stream_full_params`` all-gathers one parameter at a
  time (``DTensor.full_tensor``) as rank 0's ``WeightSender`` (built on meta tensors:
  only the layout is needed) asks for it, casting it into a staging bucket in the
  rollout dtype (``dapo.weights.stream``); the command reaches the other ranks only when
  the sender starts reading, after its ack wait, so they never sit in a gather through it;
- checkpoints (``save_sharded_checkpoint``): every rank writes its shards of the
  model and of the optimizer state with torch distributed checkpoint (DCP,
  ``training_state/``), straight from the live tensors; then a plain Hugging
  Face copy is streamed to rank 0 one parameter at a time
  (``services.learner.hf_export``), and rank 0 adds the tokenizer and
  ``trainer_state.json`` (with ``world_size`` and ``format: dcp``). No rank holds
  more than one full parameter. Resuming builds the empty sharded model and
  loads model and optimizer state from DCP (``load_model_state``,
  ``load_optimizer_state``), bit for bit; it needs the world size that wrote
  the checkpoint and is refused otherwise (``check_resume_world``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from services.learner.checkpoint import checkpoint_dir
from services.learner.hf_export import export_hf
from services.learner.ranks import Ranks
from services.learner.seams import Tokenizer

STATE_DIR = "training_state"
"""DCP folder of a sharded checkpoint: model and optimizer shards of every rank."""
FORMAT = "dcp"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (HF ``_no_split_modules`` classes): FSDP and checkpoint units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules)"
        )
    return layers


def shard_model(model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer, then on the root, with the mixed
    precision ``mp_policy`` (None: compute in the parameters' dtype); gradients are
    summed over ranks (divide factor 1)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def reshard(model: torch.nn.Module) -> None:
    """Frees the gathered parameters a no-grad forward leaves behind (the root keeps its
    own gathered after forward, expecting a backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter unsharded, in ``named_parameters`` order (a collective: all ranks)."""
    reshard(model)
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for n, p in model.named_parameters()
    }


def stream_full_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter unsharded, one at a time in ``named_parameters`` order: each is
    all-gathered when the consumer asks for it (a collective per parameter, all ranks in
    the same order), so a rank holds one full parameter at a time, not the model."""
    reshard(model)
    for n, p in model.named_parameters():
        yield n, (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def meta_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the full shape) per parameter: enough for a weight layout."""
    return [
        (n, torch.empty(p.shape, dtype=p.dtype, device="meta")) for n, p in model.named_parameters()
    ]


def save_sharded_checkpoint(
    ranks: Ranks,
    root: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer,
) -> Path:
    """All ranks: DCP shards of model and optimizer, then the streamed HF copy, tokenizer
    and trainer state from rank 0, in a temporary folder that rank 0 renames into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    reshard(model)
    if optimizer.state:  # no step yet: nothing to save (reading it would initialise it)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=tmp / STATE_DIR)  # each rank its shards, no gather
    del state
    export_hf(model, tmp, is_writer=ranks.rank == 0)
    if ranks.rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {"step": step, **trainer_state, "world_size": ranks.world, "format": FORMAT}
        (tmp / "trainer_state.json").write_text(json.dumps(doc, indent=2))
    ranks.barrier()
    if ranks.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    ranks.barrier()
    return final


def checkpoint_world_size(state: dict) -> int:
    """World size a checkpoint was written with (1 for a single-process checkpoint)."""
    return int(state.get("world_size", 1))


def check_resume_world(ckpt: Path, state: dict, ranks: Ranks) -> None:
    """Refuses a checkpoint written by another number of ranks, saying how to resume it."""
    saved = checkpoint_world_size(state)
    if saved != ranks.world:
        how = "one process (no torchrun)" if saved == 1 else f"torchrun --nproc_per_node={saved}"
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {saved} learner rank(s) but this learner has "
            f"{ranks.world}: resume it with {how}, or start a new run from its model "
            "(model.path: the checkpoint folder)"
        )
    if saved > 1 and state.get("format") != FORMAT:
        raise RuntimeError(
            f"checkpoint {ckpt} holds no DCP training state (written in the per-rank "
            "optimizer_rank*.pt layout of an earlier version): start a new run from its "
            "model (model.path: the checkpoint folder)"
        )


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    """All ranks: this rank's model shards from the checkpoint's DCP state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=ckpt / STATE_DIR)
    set_model_state_dict(model, state["model"])


def load_optimizer_state(ckpt: Path, model: torch.nn.Module, optimizer) -> bool:
    """All ranks: this rank's optimizer shards from the checkpoint's DCP state; False when
    it holds none (saved before the first optimizer step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    metadata = dcp.FileSystemReader(str(ckpt / STATE_DIR)).read_metadata()
    if not any(k.startswith("optim.") for k in metadata.state_dict_metadata):
        return False
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=ckpt / STATE_DIR)
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return True
