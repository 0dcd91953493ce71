"""The learner's ranks: one process is a world of one, ``torchrun`` makes a world of N.

Everything above this module (trainer, policy, start-up) is written once against
``Ranks``; the collectives of a world of one are identities, so the same code
runs unsharded in a single process without ``torch.distributed`` ever being
initialised. ``SoloRanks`` is that world; ``GroupRanks`` is a torchrun process
group plus the gloo side group that carries rank 0's commands to the others
(see ``services.learner.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

COMMAND_TIMEOUT = timedelta(days=30)
"""Followers wait this long for rank 0's next command: the learner may idle for hours."""


class Ranks(Protocol):
    """This process's place among the learner's ranks, and what the ranks do together."""

    rank: int
    world: int
    device: str
    """Where this rank's model lives."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks, on t's original device."""
        ...

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sum over ranks of small dicts of floats (keys may differ by rank)."""
        ...

    def send(self, *command: Any) -> None:
        """Rank 0: hand a command to every other rank."""
        ...

    def receive(self) -> tuple:
        """Ranks > 0: the next command from rank 0 (blocks until it comes)."""
        ...

    def barrier(self) -> None:
        """Wait for every rank, with no short timeout."""
        ...

    def close(self) -> None:
        """Leave the group (the process is done)."""
        ...


@dataclass
class SoloRanks:
    """A world of one: no process group, every collective is an identity."""

    device: str = "cpu"
    rank: int = 0
    world: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def send(self, *command: Any) -> None:
        """Nobody to tell."""

    def receive(self) -> tuple:
        raise RuntimeError("a world of one has no rank 0 to receive commands from")

    def barrier(self) -> None:
        """Nobody to wait for."""

    def close(self) -> None:
        """No group to leave."""


@dataclass
class GroupRanks:
    """A rank of the torchrun group, plus the side group carrying rank 0's commands."""

    rank: int
    world: int
    device: str
    commands: Any = None  # gloo ProcessGroup for commands and barriers (long timeout)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        moved = t.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(t.device)

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        parts: list[dict[str, float] | None] = [None] * self.world
        dist.all_gather_object(parts, values)
        out: dict[str, float] = {}
        for part in parts:
            for k, v in (part or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def send(self, *command: Any) -> None:
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends commands (this is rank {self.rank})")
        dist.broadcast_object_list([command], src=0, group=self.commands)

    def receive(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.commands)  # gloo side group: no short timeout

    def close(self) -> None:
        dist.destroy_process_group()


def init_ranks(device_setting: str = "auto", local_rank: int = 0) -> GroupRanks:
    """Joins the torchrun group (its rendezvous comes from torchrun's environment): NCCL and
    cuda:<local_rank> on GPU, gloo on CPU."""
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if device_setting == "cuda" and not use_cuda:
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    if use_cuda:
        local = local_rank
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return GroupRanks(dist.get_rank(), dist.get_world_size(), device, group)


def padded_share(n: int, rank: int, world: int) -> list[int | None]:
    """Indices of the ``n`` items rank ``rank`` handles when dealt round-robin, padded with
    None (a dummy item) so every rank gets ``ceil(n / world)`` entries."""
    per_rank = -(-n // world)
    return [i if (i := j * world + rank) < n else None for j in range(per_rank)]
