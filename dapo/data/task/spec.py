"""What determines the built default task; its hash names the cache's contents."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from dapo.data.task.model import ModelShape
from dapo.data.task.problems import Op
from dapo.data.task.sft import SftSettings

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    """Everything that determines the built task; hashed into the fingerprint."""

    seed: int = 0
    max_operand: int = 99
    ops: tuple[Op, ...] = ("+",)
    n_val: int = 512
    n_train: int | None = None
    shape: ModelShape = field(default_factory=ModelShape)
    sft: SftSettings = field(default_factory=SftSettings)
    base_eval_samples: int = 2
    """Samples per validation problem when measuring ``base_accuracy``."""
    threads: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
