"""What the learner loop needs from the things it is given, as protocols.

``LearnerLoop`` (``services.learner.service``) is written against these, not
against the concrete classes: ``Policy`` (``services.learner.policy``) on any
number of ranks, ``dapo.weights.WeightSender`` and a Hugging Face tokenizer in
the service; small in-memory implementations in the loop's tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch

from dapo.weights.sender import SyncStats
from dapo.weights.stream import Source
from proto.messages import TrainingBatch


class Tokenizer(Protocol):
    """Saved next to the model so a checkpoint loads as a plain HF model directory."""

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, ...]: ...


class TrainablePolicy(Protocol):
    """The policy being trained: one batch in, figures out; weights and checkpoints on
    demand. Versions count optimizer steps, so they move only when the weights do."""

    @property
    def version(self) -> int: ...

    def train_batch(self, batch: TrainingBatch) -> dict[str, float]:
        """Trains on one batch; the step's figures (loss, grad_norm, reward_mean, ...)."""
        ...

    def gather_weights(self) -> Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]]:
        """Every parameter at full size, in ``named_parameters`` order: a mapping, or a
        one-pass stream the sender reads to the end (``dapo.weights.stream``)."""
        ...

    def save_checkpoint(self, root: Path, step: int, tokenizer: Tokenizer | None) -> Path:
        """Writes the checkpoint of ``step`` under ``root``; its directory."""
        ...


class WeightBroadcaster(Protocol):
    """Gets new weights to the rollout workers (``dapo.weights.WeightSender``)."""

    def broadcast(self, version: int, named_params: Source | None = None) -> SyncStats:
        """Sends the weights as ``version`` (``named_params``: this call's tensors instead of
        the ones the sender holds); raises ``WeightSyncError`` when a worker fails."""
        ...

    def publish_checkpoint(self, version: int, checkpoint_dir: str) -> None:
        """Where a late worker loads ``version`` from before the next broadcast."""
        ...

    def disagreeing_workers(self, version: int) -> dict[str, str]:
        """Live workers not holding ``version`` bit for bit -> why."""
        ...

    def close(self) -> None: ...
