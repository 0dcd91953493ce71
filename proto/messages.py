"""Every message that travels on a stream, one pydantic model each.

Shapes and alignment: a sample's ``response_ids`` and ``logprobs`` are 1-D
arrays of equal length L (the EOS token, when emitted, is the last element and
counts in L); ``logprobs[t]`` is the log-probability of ``response_ids[t]``
under the policy that generated it (log-softmax of logits / temperature).
Token ids are int32, log-probs float32; on the wire both travel as packed
little-endian bytes (see ``proto.codec``), never as JSON lists.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

SCHEMA_VERSION = 1
LOGPROB_SLACK = 1e-3
"""Log-probabilities are <= 0; this much above 0 is rounding of a log-softmax, more is not."""


def _array_of(dtype: np.dtype):
    def convert(value):
        if isinstance(value, np.ndarray):
            if value.ndim != 1:
                raise ValueError(f"expected a 1-D array, got shape {value.shape}")
            return value if value.dtype == dtype else value.astype(dtype)
        if isinstance(value, bytes | bytearray | memoryview):
            return np.frombuffer(value, dtype=dtype)
        if isinstance(value, list | tuple):
            return np.asarray(value, dtype=dtype)
        raise ValueError(f"expected an array, list or bytes, got {type(value).__name__}")

    return convert


_to_list = PlainSerializer(lambda a: a.tolist(), when_used="json")
TokenIds = Annotated[np.ndarray, BeforeValidator(_array_of(np.dtype("<i4"))), _to_list]
"""1-D int32 token ids."""
LogProbs = Annotated[np.ndarray, BeforeValidator(_array_of(np.dtype("<f4"))), _to_list]
"""1-D float32 log-probabilities, aligned with the token ids they belong to."""


class Message(BaseModel):
    """Base of every wire message: strict fields and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[str] = "message"
    schema_version: Literal[1] = SCHEMA_VERSION
    """Wire schema version; a consumer that does not know it dead-letters the message."""
    run_id: str = Field(min_length=1, max_length=128)
    """Run the message belongs to."""


class SamplingParams(BaseModel):
    """How to sample: the one type for it, from the sampler's prompt task through the rollout
    worker to the engine's ``generate`` and evaluation. Hashable (frozen), so requests can be
    grouped by it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=4096)
    """G: completions per prompt."""
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    """Logits are divided by this before softmax; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass: draw only from the smallest set of most likely tokens holding it."""
    top_k: int = Field(-1, ge=-1, le=1_000_000)
    """Draw only from the k most likely tokens; -1 disables it."""
    max_new_tokens: int = Field(16, ge=1, le=1_048_576)
    """Generation budget per completion, in tokens (an emitted EOS counts)."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Seed of the sampling RNG; None draws fresh randomness on every call."""

    @model_validator(mode="after")
    def _top_k_on_or_off(self) -> SamplingParams:
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or >= 1, got 0")
        return self


class PromptTask(Message):
    """sampler -> rollout: generate G samples for one prompt."""

    kind: ClassVar[str] = "prompt_task"
    group_id: str = Field(min_length=1)
    """Unique id of the group these samples will form; the idempotency key downstream."""
    prompt_id: str = Field(min_length=1)
    """Dataset row identity (file split and row index)."""
    epoch: int = Field(0, ge=0)
    """Dataset epoch the prompt was drawn in."""
    prompt_text: str
    """Rendered prompt (templates applied)."""
    prompt_ids: TokenIds
    """Tokenised prompt_text, shape (P,)."""
    ground_truth: str
    """Reference answer for the reward."""
    data_source: str = "unknown"
    """Dataset name, kept for per-source metrics."""
    sampling: SamplingParams
    """Sampling parameters; ``sampling.n`` is G, the samples to generate."""
    dispatch_version: int = Field(0, ge=0)
    """Policy version current when the sampler dispatched the task."""
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""

    @model_validator(mode="after")
    def _nonempty_prompt(self) -> PromptTask:
        if self.prompt_ids.size == 0:
            raise ValueError("prompt_ids is empty")
        if self.sampling.n < 2:
            raise ValueError(f"a group needs G >= 2 samples, got sampling.n={self.sampling.n}")
        return self


class Sample(BaseModel):
    """One generated answer."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    response_ids: TokenIds
    """Generated token ids, shape (L,), EOS included when emitted."""
    logprobs: LogProbs
    """Log-prob of each response token under the generating policy, shape (L,)."""
    finish_reason: Literal["stop", "length"]
    """stop: ended with EOS; length: hit max_new_tokens."""
    versions: TokenIds
    """Policy version of each segment of the response, shape (K,), K >= 1, non-decreasing:
    weights may change while a sample is generated (an in-flight update)."""
    version_starts: TokenIds
    """Index of the first token of each segment, shape (K,): 0, then strictly increasing
    and below L. Token t was generated by ``versions[k]`` for the last k with
    ``version_starts[k] <= t``."""

    @model_validator(mode="after")
    def _aligned(self) -> Sample:
        if self.response_ids.shape != self.logprobs.shape:
            raise ValueError(
                f"response_ids has {self.response_ids.size} tokens but logprobs has "
                f"{self.logprobs.size}"
            )
        if self.response_ids.size == 0:
            raise ValueError("response_ids is empty")
        lp = self.logprobs
        if not np.isfinite(lp).all() or (lp > LOGPROB_SLACK).any():
            bad = lp[~np.isfinite(lp) | (lp > LOGPROB_SLACK)][:3].tolist()
            raise ValueError(f"logprobs must be finite and <= 0, got {bad}")
        v, s = self.versions, self.version_starts
        if v.size == 0 or v.shape != s.shape:
            raise ValueError(f"versions ({v.size}) and version_starts ({s.size}) must be "
                             "non-empty and of equal length")  # fmt: skip
        if s[0] != 0 or (np.diff(s) <= 0).any() or s[-1] >= self.response_ids.size:
            raise ValueError(f"version_starts {s.tolist()} must start at 0, increase and stay "
                             f"below the {self.response_ids.size} response tokens")  # fmt: skip
        if (v < 0).any() or (np.diff(v) < 0).any():
            raise ValueError(f"versions {v.tolist()} must be non-negative and non-decreasing")
        return self

    @property
    def oldest_version(self) -> int:
        """The version that generated the first token: the oldest of the sample."""
        return int(self.versions[0])

    def token_versions(self) -> np.ndarray:
        """The generating version of every response token, shape (L,) int64."""
        lengths = np.diff(np.append(self.version_starts, self.response_ids.size))
        return np.repeat(self.versions.astype(np.int64), lengths)


class ScoredSample(Sample):
    """A sample with its reward."""

    score: float
    """Reward used for the advantage: verifier score (+1/-1) plus overlong penalty."""
    acc: bool
    """Verifier verdict alone, without the penalty."""
    overlong_penalty: float = Field(le=0.0)
    """Soft overlong punishment already included in score (<= 0)."""
    length: int = Field(ge=1)
    """Response length in tokens, EOS counted."""
    truncated: bool
    """True when finish_reason == 'length'."""
    pred: str = ""
    """Normalised extracted answer (for inspection)."""

    @model_validator(mode="after")
    def _consistent(self) -> ScoredSample:
        if self.length != self.response_ids.size:
            raise ValueError(f"length {self.length} != {self.response_ids.size} response tokens")
        if self.truncated != (self.finish_reason == "length"):
            raise ValueError("truncated must equal finish_reason == 'length'")
        return self


class _GroupBase(Message):
    group_id: str = Field(min_length=1)
    """Idempotency key, copied from the prompt task."""
    prompt_id: str = Field(min_length=1)
    """Dataset row identity."""
    epoch: int = Field(0, ge=0)
    """Dataset epoch."""
    prompt_ids: TokenIds
    """Prompt tokens, shape (P,)."""
    ground_truth: str
    """Reference answer."""
    data_source: str = "unknown"
    """Dataset name."""
    n: int = Field(ge=2)
    """G; equals len(samples)."""
    policy_version: int = Field(ge=0)
    """The oldest version that generated any token of the group (the minimum of its
    samples' ``oldest_version``): what its staleness is judged by."""
    dispatch_version: int = Field(0, ge=0)
    """Policy version when the task was dispatched."""
    worker_id: str = Field(min_length=1)
    """Rollout worker that generated the group."""
    engine: Literal["hf", "vllm"]
    """Inference engine used."""
    gen_seconds: float = Field(ge=0.0)
    """Wall time spent generating this group (its share of the batch)."""
    finished_at: float = Field(default_factory=time.time)
    """Unix seconds when generation finished."""

    @model_validator(mode="after")
    def _group_size(self):
        samples = self.samples  # type: ignore[attr-defined]
        if len(samples) != self.n:
            raise ValueError(f"group has {len(samples)} samples, expected n={self.n}")
        oldest = min(s.oldest_version for s in samples)
        if oldest != self.policy_version:
            raise ValueError(
                f"policy_version {self.policy_version} is not the oldest version of the "
                f"group's tokens ({oldest})"
            )
        return self


class RolloutGroup(_GroupBase):
    """rollout -> reward: G samples for one prompt."""

    kind: ClassVar[str] = "rollout_group"
    samples: list[Sample]
    """The G samples."""


class ScoredGroup(_GroupBase):
    """reward -> sampler: G scored samples."""

    kind: ClassVar[str] = "scored_group"
    samples: list[ScoredSample]
    """The G scored samples."""
    reward_seconds: float = Field(0.0, ge=0.0)
    """Wall time spent scoring."""


class BatchStats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gen_rounds: int = Field(0, ge=0)
    """Generation rounds (multiples of train_batch_size prompts) it took to fill the batch."""
    kept: int = Field(0, ge=0)
    """Groups that passed the dynamic-sampling filter while filling this batch."""
    filtered_all_correct: int = Field(0, ge=0)
    """Groups dropped because every sample was correct."""
    filtered_all_wrong: int = Field(0, ge=0)
    """Groups dropped because every sample was wrong."""
    dropped_stale: int = Field(0, ge=0)
    """Groups dropped for exceeding max_staleness."""
    mean_version_lag: float = Field(0.0, ge=0.0)
    """Mean (learner version - generating version) over the batch's groups at assembly."""


class TrainingBatch(Message):
    """Exactly train_batch_size groups, as the learner trains them: rebuilt from a
    ``TrainingBatchRef`` (which is what travels on ``batches``) and the groups it names."""

    kind: ClassVar[str] = "training_batch"
    batch_id: int = Field(ge=0)
    """Training step this batch is for (0-based); the idempotency key."""
    groups: list[ScoredGroup] = Field(min_length=1)
    """The kept groups."""
    stats: BatchStats = Field(default_factory=BatchStats)
    """How the batch was filled."""
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""


SCORED_GROUP = "sampler"
"""The consumer group of ``scored`` whose pending list holds the groups of published batches."""
HELD_CONSUMER = "held"
"""The consumer of ``SCORED_GROUP`` that owns the kept groups of published, not yet
checkpointed batches: nobody reads as it, so they stay pending (and untrimmed) until the
learner acknowledges them with their batch."""


class TrainingBatchRef(Message):
    """sampler -> learner, on ``batches``: a training batch by reference. The groups stay the
    ``ScoredGroup`` entries the reward service wrote on ``scored``, pending in consumer group
    ``SCORED_GROUP`` under ``HELD_CONSUMER`` until a checkpoint holds the batch; the learner
    reads them by entry id and rebuilds the ``TrainingBatch``. A few dozen bytes per group,
    whatever the responses' length."""

    kind: ClassVar[str] = "training_batch_ref"
    batch_id: int = Field(ge=0)
    """Training step this batch is for (0-based); the idempotency key."""
    entry_ids: list[str] = Field(min_length=1, max_length=1_000_000)
    """Stream entry ids of the groups on ``scored``, in batch order."""
    group_ids: list[str] = Field(min_length=1, max_length=1_000_000)
    """Group id of each entry (``entry_ids[i]`` holds ``group_ids[i]``): checked on reading."""
    stats: BatchStats = Field(default_factory=BatchStats)
    """How the batch was filled."""
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""

    @model_validator(mode="after")
    def _aligned(self) -> TrainingBatchRef:
        if len(self.entry_ids) != len(self.group_ids):
            raise ValueError(f"{len(self.entry_ids)} entry ids for {len(self.group_ids)} groups")
        if len(set(self.entry_ids)) != len(self.entry_ids):
            raise ValueError("entry_ids repeat")
        bad = [e for e in self.entry_ids if not _ENTRY_ID.fullmatch(e)][:3]
        if bad:
            raise ValueError(f"entry_ids {bad} are not stream entry ids '<ms>-<seq>'")
        return self


_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


class WeightVersion(Message):
    """learner -> everyone: a new policy version exists."""

    kind: ClassVar[str] = "weight_version"
    version: int = Field(ge=0)
    """Policy version (0 = initial weights)."""
    step: int = Field(ge=0)
    """Training batches consumed so far."""
    checksum: str
    """Checksum of the weights as broadcast."""
    num_bytes: int = Field(ge=0)
    """Size of the broadcast."""
    checkpoint_dir: str | None = None
    """Newest checkpoint on disk (for late joiners), if any."""
    created_at: float = Field(default_factory=time.time)
    """Unix seconds."""


class WeightReport(Message):
    """rollout -> learner: what a worker has loaded."""

    kind: ClassVar[str] = "weight_report"
    worker_id: str = Field(min_length=1)
    """Reporting worker."""
    version: int = Field(ge=0)
    """Version loaded."""
    checksum: str
    """Checksum of the loaded weights."""


STREAM_MESSAGES: dict[str, type[Message]] = {
    "prompts": PromptTask,
    "rollouts": RolloutGroup,
    "scored": ScoredGroup,
    "batches": TrainingBatchRef,
    "versions": WeightVersion,
    "weight_reports": WeightReport,
}
"""Which message type each stream of a run carries."""
