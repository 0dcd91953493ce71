"""The learner sharded across ranks with FSDP2 (``torchrun --nproc_per_node=N``).

With ``WORLD_SIZE == 1`` none of this is used: the learner is one process.

With ``WORLD_SIZE > 1`` (backend NCCL on CUDA, gloo on CPU, same code):

- every rank loads the model, then ``fully_shard`` wraps each decoder layer and
  the root, so parameters, gradients and optimizer state are split over ranks.
  Gradients are reduced as a *sum* (divide factor 1, plain SUM collectives:
  gloo has no PREMUL_SUM), not a mean;
- rank 0 alone runs the service shell (health port, heartbeat, bus, weight
  sender, checkpoints, metrics). The other ranks run ``follow``: they wait for
  commands from rank 0 on a gloo side group with a long timeout (the learner
  may idle for hours between batches), then join the collectives the command
  implies. Commands: ``("batch", fields)`` (a codec-encoded TrainingBatch),
  ``("weights",)`` (gather full parameters for the rollout broadcast),
  ``("checkpoint", root, step)`` and ``("stop",)``. Followers ignore SIGTERM:
  rank 0 sees it, writes the final checkpoint with them, then sends stop;
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
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from services.learner.checkpoint import checkpoint_dir

COMMAND_TIMEOUT = timedelta(days=30)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Ranks:
    """This process's place in the group, plus the side group carrying rank 0's commands."""

    rank: int
    world: int
    device: str
    commands: Any = None  # gloo ProcessGroup for commands

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks, returned on t's original device."""
        moved = t.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(t.device)

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sum over ranks of small dicts of floats (keys may differ by rank)."""
        parts: list[dict[str, float] | None] = [None] * self.world
        dist.all_gather_object(parts, values)
        out: dict[str, float] = {}
        for part in parts:
            for k, v in (part or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def send(self, *command: Any) -> None:
        """Rank 0: hand a command to every other rank."""
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends commands (this is rank {self.rank})")
        dist.broadcast_object_list([command], src=0, group=self.commands)

    def receive(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]


def init_ranks(device_setting: str = "auto") -> Ranks:
    """Joins the torchrun group: NCCL and cuda:LOCAL_RANK on GPU, gloo on CPU."""
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if device_setting == "cuda" and not use_cuda:
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, group)


def padded_share(n: int, rank: int, world: int) -> list[int | None]:
    """Indices of the ``n`` items rank ``rank`` handles when dealt round-robin, padded with
    None (a dummy item) so every rank gets ``ceil(n / world)`` entries."""
    per_rank = -(-n // world)
    return [i if (i := j * world + rank) < n else None for j in range(per_rank)]


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
    tokenizer,
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
    dist.barrier(group=ranks.commands)  # gloo side group: no short timeout
    torch.save(local_optimizer_state(optimizer), tmp / f"optimizer_rank{ranks.rank}.pt")
    if ranks.rank == 0:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {"step": step, **trainer_state, "world_size": ranks.world}
        (tmp / "trainer_state.json").write_text(json.dumps(doc, indent=2))
    dist.barrier(group=ranks.commands)  # gloo side group: no short timeout
    if ranks.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier(group=ranks.commands)  # gloo side group: no short timeout
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


class LeaderTrainer:
    """Rank 0's trainer: ships each batch to the other ranks, then trains in lock-step."""

    def __init__(self, trainer, ranks: Ranks) -> None:
        self.trainer, self.ranks = trainer, ranks

    def train_batch(self, batch) -> dict[str, float]:
        from proto.codec import encode

        self.ranks.send("batch", {k: bytes(v) for k, v in encode(batch).items()})
        return self.trainer.train_batch(batch)

    def __getattr__(self, name: str):
        return getattr(self.trainer, name)


class LeaderSender:
    """Rank 0's weight sender: gathers the full parameters with every rank, then sends them."""

    def __init__(self, sender, model: torch.nn.Module, ranks: Ranks) -> None:
        self.sender, self.model, self.ranks = sender, model, ranks

    def broadcast(self, version: int):
        self.ranks.send("weights")
        return self.sender.broadcast(version, named_params=full_params(self.model))

    def __getattr__(self, name: str):
        return getattr(self.sender, name)


def leader_save(ranks: Ranks):
    """A ``LearnerLoop.save`` for rank 0: tells the other ranks, then saves with them."""

    def save(root: Path, step: int, model, tokenizer, trainer_state: dict, optimizer) -> Path:
        ranks.send("checkpoint", str(root), step)
        return save_sharded_checkpoint(
            ranks, root, step, model, tokenizer, trainer_state, optimizer
        )

    return save


def follow(ranks: Ranks, trainer) -> None:
    """Ranks > 0: carry out rank 0's commands until it says stop."""
    from proto.codec import decode
    from proto.messages import TrainingBatch

    while True:
        kind, *args = ranks.receive()
        if kind == "batch":
            trainer.train_batch(decode(args[0], TrainingBatch))
        elif kind == "weights":
            full_params(trainer.model)
        elif kind == "checkpoint":
            root, step = Path(args[0]), int(args[1])
            save_sharded_checkpoint(
                ranks, root, step, trainer.model, None, trainer.state(), trainer.optimizer
            )
        elif kind == "stop":
            return
        else:
            raise ValueError(f"unknown learner command {kind!r} from rank 0")
