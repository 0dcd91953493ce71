"""The policy being trained, on however many ranks the learner has.

``Policy`` owns the trainer and the ranks. Rank 0 calls it from the learner
loop; with more than one rank each call first sends the matching command to
the other ranks, which run ``Policy.follow`` and join the collectives the
command implies (see ``services.learner.distributed``). With one rank there is
nobody to tell and the same calls just do the work.

``build_policy`` is the one way any rank gets its policy: the model from the
newest checkpoint (or the base model), sharded with FSDP2 only when the world
has more than one rank, and the trainer and optimizer state that checkpoint
holds: ``optimizer.pt`` for one rank, ``optimizer_rank{r}.pt`` per rank
otherwise, so a checkpoint resumes only at the world size that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dapo.data.models import resolve_model_dir
from proto.codec import decode, encode
from proto.messages import TrainingBatch
from proto.runspec import RunSpec
from services.learner.checkpoint import read_optimizer_state, read_trainer_state, save_checkpoint
from services.learner.distributed import (
    checkpoint_world_size,
    full_params,
    load_local_optimizer_state,
    read_sharded_optimizer_state,
    save_sharded_checkpoint,
    shard_model,
)
from services.learner.ranks import Ranks
from services.learner.seams import Tokenizer
from services.learner.trainer import Trainer


class Policy:
    """The trainer on its ranks: what the learner loop trains, broadcasts and saves."""

    def __init__(self, trainer: Trainer, ranks: Ranks) -> None:
        self.trainer, self.ranks = trainer, ranks

    @property
    def version(self) -> int:
        return self.trainer.version

    def state(self) -> dict:
        """Version and optimizer counters (what ``trainer_state.json`` records)."""
        return self.trainer.state()

    def train_batch(self, batch: TrainingBatch) -> dict[str, float]:
        """One batch on every rank (each gets the whole batch); the global figures."""
        if self.ranks.world > 1:  # encoded only when someone else needs it
            self.ranks.send("batch", {k: bytes(v) for k, v in encode(batch).items()})
        return self.trainer.train_batch(batch)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Full parameters in ``named_parameters`` order: an all-gather when sharded, the
        parameters themselves (no copy) with one rank."""
        self._tell("weights")
        return full_params(self.trainer.model)

    def save_checkpoint(self, root: Path, step: int, tokenizer: Tokenizer | None) -> Path:
        self._tell("checkpoint", str(root), step)
        return self._write_checkpoint(root, step, tokenizer)

    def follow(self) -> None:
        """Ranks > 0: carry out rank 0's commands until it says stop."""
        while True:
            kind, *args = self.ranks.receive()
            if kind == "batch":
                self.trainer.train_batch(decode(args[0], TrainingBatch))
            elif kind == "weights":
                full_params(self.trainer.model)
            elif kind == "checkpoint":
                self._write_checkpoint(Path(args[0]), int(args[1]), None)
            elif kind == "stop":
                return
            else:
                raise ValueError(f"unknown learner command {kind!r} from rank 0")

    def _tell(self, *command: object) -> None:
        if self.ranks.world > 1:
            self.ranks.send(*command)

    def _write_checkpoint(self, root: Path, step: int, tokenizer: Tokenizer | None) -> Path:
        t = self.trainer
        if self.ranks.world == 1:
            return save_checkpoint(root, step, t.model, tokenizer, t.state(), t.optimizer)
        return save_sharded_checkpoint(
            self.ranks, root, step, t.model, tokenizer, t.state(), t.optimizer
        )


def load_models(
    spec: RunSpec, cache_dir: str | Path | None, ckpt: Path | None, ranks: Ranks
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The policy model (newest checkpoint, else the base model) and, with a KL loss, the
    frozen reference (always the base model), on this rank's device; FSDP2-sharded when
    the world has more than one rank."""
    from transformers import AutoModelForCausalLM

    base = resolve_model_dir(spec.model, cache_dir)
    dtype = getattr(torch, spec.model.dtype)

    def load(source: Path, frozen: bool) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).to(ranks.device)
        if frozen:  # before sharding, so FSDP2 sees frozen parameters
            model.eval().requires_grad_(False)
        return shard_model(model) if ranks.world > 1 else model

    model = load(ckpt or base, frozen=False)
    ref = load(base, frozen=True) if spec.actor.use_kl_loss else None
    return model, ref


def read_rank_optimizer_state(ckpt: Path, state: dict, ranks: Ranks) -> dict | None:
    """This rank's optimizer state in ``ckpt``; refused when another world size wrote it."""
    if ranks.world > 1:
        return read_sharded_optimizer_state(ckpt, state, ranks)
    saved = checkpoint_world_size(ckpt, state)
    if saved != 1:
        raise RuntimeError(
            f"checkpoint {ckpt} holds optimizer shards of {saved} ranks: "
            f"resume with torchrun --nproc_per_node={saved}"
        )
    return read_optimizer_state(ckpt)


def build_policy(
    spec: RunSpec, cache_dir: str | Path | None, ckpt: Path | None, pad_id: int, ranks: Ranks
) -> tuple[Policy, int]:
    """Every rank: its policy, resumed from ``ckpt`` when given, and the step to go on at."""
    torch.manual_seed(spec.data.seed)
    model, ref = load_models(spec, cache_dir, ckpt, ranks)
    trainer = Trainer(model, spec, ranks.device, pad_id, ref_model=ref, ranks=ranks)
    if ckpt is None:
        return Policy(trainer, ranks), 0
    state = read_trainer_state(ckpt)
    optimizer_state = read_rank_optimizer_state(ckpt, state, ranks)
    if optimizer_state is not None:  # shards become DTensors laid out like their parameter
        load_local_optimizer_state(trainer.optimizer, optimizer_state)
    trainer.load_state(state, None)
    return Policy(trainer, ranks), int(state["step"])
