"""The learner sharded across ranks with FSDP2 (``torchrun --nproc_per_node=N``).

One start-up path serves every world size (``services.learner.main``): a
plain process is a world of one (``SoloRanks``: no process group, collectives
are identities), so the model is not sharded, the sender adopts its
parameters and checkpoints carry a single ``optimizer.pt``.

With ``WORLD_SIZE > 1`` (``GroupRanks``; backend NCCL on CUDA, gloo on CPU,
same code):

- every rank loads the model, then ``fully_shard`` wraps each decoder layer and
  the root, so parameters, gradients and optimizer state are split over ranks.
  Gradients are reduced as a *sum* (divide factor 1, plain SUM collectives:
  gloo has no PREMUL_SUM), not a mean;
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
- weights for rollout workers: ``full_params`` all-gathers each parameter
  (``DTensor.full_tensor``) and rank 0 hands them to a ``WeightSender`` built
  with ``share_storage=False`` on meta tensors (only the layout is needed);
- checkpoints: rank 0 writes the HF model from the gathered full state dict,
  the tokenizer and ``trainer_state.json`` (with ``world_size``); every rank
  writes its optimizer shard as ``optimizer_rank{r}.pt``. Resuming needs the
  same world size and is refused otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from services.learner.checkpoint import checkpoint_dir
from services.learner.ranks import Ranks
from services.learner.seams import Tokenizer


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer (HF ``_no_split_modules`` classes), then
    on the root; gradients are summed over ranks (divide factor 1)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules)"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter unsharded, in ``named_parameters`` order (a collective: all ranks)."""
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for n, p in model.named_parameters()
    }


def meta_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the full shape) per parameter: enough for a weight layout."""
    return [
        (n, torch.empty(p.shape, dtype=p.dtype, device="meta")) for n, p in model.named_parameters()
    ]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with this rank's shard of each DTensor as a plain tensor."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.to_local().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Inverse of ``local_optimizer_state``: shards become DTensors laid out like their param."""
    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                    state[k] = DTensor.from_local(
                        v.to(p.device),
                        p.device_mesh,
                        p.placements,
                        shape=p.shape,
                        stride=p.stride(),
                    )


def save_sharded_checkpoint(
    ranks: Ranks,
    root: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer,
) -> Path:
    """All ranks: HF model + tokenizer + trainer state from rank 0, one optimizer shard per
    rank, written to a temporary folder that rank 0 renames into place."""
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    state = full_state_dict(model)
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    torch.save(local_optimizer_state(optimizer), tmp / f"optimizer_rank{ranks.rank}.pt")
    if ranks.rank == 0:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {"step": step, **trainer_state, "world_size": ranks.world}
        (tmp / "trainer_state.json").write_text(json.dumps(doc, indent=2))
    ranks.barrier()
    if ranks.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    ranks.barrier()
    return final


def checkpoint_world_size(ckpt: Path, state: dict) -> int:
    """World size a checkpoint was written with (1 for a single-process optimizer.pt)."""
    return int(state.get("world_size", 1))


def read_sharded_optimizer_state(ckpt: Path, state: dict, ranks: Ranks) -> dict:
    """This rank's optimizer shard; the checkpoint must come from the same world size."""
    saved = checkpoint_world_size(ckpt, state)
    if saved != ranks.world:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {saved} learner rank(s) but WORLD_SIZE is "
            f"{ranks.world}: resume with --nproc_per_node={saved} (optimizer state is sharded)"
        )
    path = ckpt / f"optimizer_rank{ranks.rank}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)
