"""What a run looks like from outside: its lifecycle record, the learner's latest step
report and the sampler's account. Services write them into the run store (Redis, beside
the streams); the control API and the CLI only read them, never a service's files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proto.lifecycle import RunStatus
from proto.messages import SCHEMA_VERSION


class StartupFailure(BaseModel):
    """Start-ups of one kind of service that failed in a row, and the last one's reason."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1)
    """Failed start-ups since one of this kind last reached its loop."""
    error: str = Field(max_length=4000)
    """Why the last one failed (the service, its worker id and the error)."""


class RunState(BaseModel):
    """The run's lifecycle record."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str
    status: RunStatus = "pending"
    """Lifecycle state (``proto.lifecycle``); services follow it."""
    step: int = Field(0, ge=0)
    """Training batches consumed."""
    policy_version: int = Field(0, ge=0)
    """Current policy version."""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    error: str | None = None
    """Why the run failed, when it did."""
    restarts: dict[str, int] = Field(default_factory=dict)
    """Times each service process (by worker id) was restarted after dying."""
    final_checkpoint: str | None = None
    """Checkpoint the learner wrote when the run ended, once it has."""
    startup_failures: dict[str, StartupFailure] = Field(default_factory=dict)
    """Service kinds whose latest start-ups failed (``RunStore.record_startup_failure``)."""


class StepReport(BaseModel):
    """The learner's figures of one training step (a line of its ``metrics.jsonl``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    step: int = Field(ge=1)
    """Training batches consumed, this one included."""
    batch_id: int = Field(ge=0)
    """Id of the batch trained."""
    version: int = Field(ge=0)
    """Policy version after the step."""
    time: float = Field(default_factory=time.time)
    """Unix seconds at the end of the step."""
    figures: dict[str, float | None] = Field(default_factory=dict)
    """Loss, reward, accuracy, clip fractions, entropy, lag, ...; None where not finite."""

    @field_validator("figures", mode="before")
    @classmethod
    def _finite_or_none(cls, value: Mapping[str, float]) -> dict[str, float | None]:
        return {
            k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in value.items()
        }


ACCOUNT_FIELDS = (
    "dispatched",
    "trained",
    "filtered_all_correct",
    "filtered_all_wrong",
    "dropped_stale",
    "dead",
    "batches",
    "scored_since_batch",
)
"""Counters of the sampler's account, kept in one Redis hash per run."""


def account_from_counters(raw: Mapping) -> dict[str, int]:
    """The account from its hash (bytes or str keys), plus ``in_flight`` = dispatched -
    trained - filtered - stale - dead (dead-lettered): prompts dispatched and not yet
    resolved."""
    acc = {f: 0 for f in ACCOUNT_FIELDS}
    acc.update({(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()})
    resolved = acc["trained"] + acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    acc["in_flight"] = acc["dispatched"] - resolved - acc["dropped_stale"] - acc["dead"]
    return acc
