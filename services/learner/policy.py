"""The policy being trained, on however many ranks the learner has.

``Policy`` owns the trainer and the ranks. Rank 0 calls it from the learner
loop; with more than one rank each call first sends the matching command to
the other ranks, which run ``Policy.follow`` and join the collectives the
command implies (see ``services.learner.distributed``). With one rank there is
nobody to tell and the same calls just do the work.

``build_policy`` is the one way any rank gets its policy: the model and the
trainer, resumed from the newest checkpoint when there is one. One rank loads
the model plainly (``from_pretrained``) and resumes from the checkpoint's plain
files (HF model + ``optimizer.pt``). Several ranks build it sharded on ``meta``
(``services.learner.model_init``): a fresh run loads the base model's weights
from rank 0, a resumed one the model and optimizer shards of the checkpoint's
DCP state (``services.learner.distributed``). A checkpoint resumes only at the
world size that wrote it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from dapo.data.models import resolve_model_dir
from proto.codec import decode, encode
from proto.messages import TrainingBatch
from proto.runspec import RunSpec
from services.learner.checkpoint import read_optimizer_state, read_trainer_state, save_checkpoint
from services.learner.distributed import (
    check_resume_world,
    full_params,
    load_model_state,
    load_optimizer_state,
    save_sharded_checkpoint,
    stream_full_params,
)
from services.learner.model_init import load_plain, load_sharded
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

    def gather_weights(self) -> Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]]:
        """Full parameters in ``named_parameters`` order: with one rank the parameters
        themselves (no copy); sharded, a one-pass stream that tells the other ranks and
        all-gathers one parameter at a time as it is read (to be read to the end)."""
        if self.ranks.world == 1:
            return full_params(self.trainer.model)
        return self._stream_weights()

    def _stream_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._tell("weights")  # on the first read, so the other ranks gather in step
        yield from stream_full_params(self.trainer.model)

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
                for _ in stream_full_params(self.trainer.model):
                    pass
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
    the world has more than one rank, the base model's files then read by rank 0 only."""
    if ranks.world == 1:
        base = resolve_model_dir(spec.model, cache_dir)
        model = load_plain(ckpt or base, spec, ranks.device, frozen=False)
        ref = load_plain(base, spec, ranks.device, frozen=True) if spec.actor.use_kl_loss else None
        return model, ref
    base = resolve_model_dir(spec.model, cache_dir) if ranks.rank == 0 else None
    if ckpt is None:
        model = load_sharded(base, spec, ranks, frozen=False, weights=True)
    else:  # the config of the checkpoint's HF copy, the weights of its DCP state
        model = load_sharded(ckpt, spec, ranks, frozen=False, weights=False)
        load_model_state(ckpt, model)
    ref = (
        load_sharded(base, spec, ranks, frozen=True, weights=True)
        if spec.actor.use_kl_loss
        else None
    )
    return model, ref


def build_policy(
    spec: RunSpec, cache_dir: str | Path | None, ckpt: Path | None, pad_id: int, ranks: Ranks
) -> tuple[Policy, int]:
    """Every rank: its policy, resumed from ``ckpt`` when given, and the step to go on at."""
    torch.manual_seed(spec.data.seed)
    state = None
    if ckpt is not None:  # refused before anything is built
        state = read_trainer_state(ckpt)
        check_resume_world(ckpt, state, ranks)
    model, ref = load_models(spec, cache_dir, ckpt, ranks)
    trainer = Trainer(model, spec, ranks.device, pad_id, ref_model=ref, ranks=ranks)
    if ckpt is None or state is None:
        return Policy(trainer, ranks), 0
    if ranks.world > 1:
        load_optimizer_state(ckpt, model, trainer.optimizer)
        trainer.load_state(state, None)
    else:
        trainer.load_state(state, read_optimizer_state(ckpt))
    return Policy(trainer, ranks), int(state["step"])
