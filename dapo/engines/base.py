"""The inference-engine interface of the rollout service, and its result types.

An engine turns tokenised prompts into G sampled completions each and keeps a
copy of the policy weights that the learner updates in place. Two engines
implement it: the portable Hugging Face transformers engine (``hf_engine``)
and vLLM on GPU pods.

Meaning of the recorded log-probs
---------------------------------
For every sampled response token ``y_t`` the engine records

    logp_t = log_softmax(logits_t / temperature)[y_t]

where ``logits_t`` are the policy's raw next-token logits given the prompt and
``y_<t``. This is the temperature-scaled distribution *before* top-k / top-p
truncation: truncation only decides which tokens may be drawn, it does not
renormalise the recorded numbers. It is exactly what the learner recomputes
with a teacher-forced forward pass at the same temperature (verl divides the
logits by the rollout temperature and takes log_softmax the same way, without
top-p/top-k), so rollout and learner log-probs agree up to numerics when the
weights are the same. With ``temperature == 0`` decoding is greedy and the
recorded log-probs are those of the untempered distribution (temperature 1).

In-flight weight updates
------------------------
A generation of 20k tokens at 32B parameters lasts minutes; a worker that took
new weights only between generations would miss most updates. So ``generate``
accepts ``between_steps`` (``BetweenSteps``): a callback the engine calls
between forward passes, which may load new weights through ``load_weights``
and returns their version (None: nothing loaded). Tokens sampled after it
returned a version come from the new weights, and their log-probs are the new
weights' ones; the KV cache of the positions already processed is kept, as in
PipelineRL, so those keys and values are still the old weights' (an update
that leaves them unchanged, such as one of ``lm_head`` alone, makes every later
log-prob equal the new model's teacher-forced one). Each ``Completion`` says
where its version changed (``weight_updates``; ``version_segments`` turns that
into ``proto.messages.Sample``'s run-length segments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from proto.messages import SamplingParams

FinishReason = Literal["stop", "length"]

BetweenSteps = Callable[[], int | None]
"""Called by ``InferenceEngine.generate`` between forward passes, from the generating
thread: loads new weights into the engine if some are ready and returns their version, or
returns None having loaded nothing. It must not call ``generate``."""


@dataclass(frozen=True, eq=False)
class Completion:
    """One sampled response to one prompt.

    ``token_ids`` and ``logprobs`` are aligned 1-D arrays of the same length L
    (1 <= L <= max_new_tokens): ``logprobs[t]`` is the log-prob of
    ``token_ids[t]`` as defined in the module docstring. When
    ``finish_reason == "stop"`` the last token is the EOS token that ended the
    sample (and no EOS occurs before it); when ``"length"`` the budget ran out,
    L == max_new_tokens and no EOS occurs.
    """

    token_ids: np.ndarray
    """(L,) int32 response token ids, prompt excluded."""
    logprobs: np.ndarray
    """(L,) float32 log-probs of the sampled tokens under the generating policy."""
    finish_reason: FinishReason
    weight_updates: tuple[tuple[int, int], ...] = ()
    """(token index, version) of each weight update taken while this completion was being
    generated, in order: tokens from that index on were sampled by that version (index 0:
    before the first token). Empty: the weights the engine held when ``generate`` began."""

    def __post_init__(self) -> None:
        if self.token_ids.ndim != 1 or self.token_ids.dtype != np.int32:
            raise ValueError(
                f"Completion.token_ids must be a 1-D int32 array, got "
                f"{self.token_ids.dtype} with shape {self.token_ids.shape}"
            )
        if self.logprobs.dtype != np.float32 or self.logprobs.shape != self.token_ids.shape:
            raise ValueError(
                f"Completion.logprobs must be float32 with shape {self.token_ids.shape}, got "
                f"{self.logprobs.dtype} with shape {self.logprobs.shape}"
            )
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(
                f"Completion.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}"
            )
        indices = [index for index, _ in self.weight_updates]
        if indices != sorted(indices) or any(not 0 <= i < len(self) for i in indices):
            raise ValueError(
                f"Completion.weight_updates indices {indices} must be non-decreasing and within "
                f"the {len(self)} tokens"
            )

    def version_segments(self, start_version: int) -> tuple[list[int], list[int]]:
        """``(versions, version_starts)`` of ``proto.messages.Sample``, given the version the
        engine held when ``generate`` began: an update overrides an earlier one at the same
        token index, and an update to the version already held starts no segment."""
        versions, starts = [start_version], [0]
        for index, version in self.weight_updates:
            if index == starts[-1]:
                versions[-1] = version
                if len(versions) > 1 and versions[-2] == version:
                    versions.pop()
                    starts.pop()
            elif version != versions[-1]:
                versions.append(version)
                starts.append(index)
        return versions, starts

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@runtime_checkable
class InferenceEngine(Protocol):
    """What the rollout worker needs from an inference engine."""

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        between_steps: BetweenSteps | None = None,
    ) -> list[list[Completion]]:
        """For each prompt (token ids), ``params.n`` completions, in prompt order.

        ``between_steps`` is asked for new weights between forward passes (module doc);
        each engine says how often. Completions record the updates it took.
        """
        ...

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's parameters, named as in the Hugging Face model (tied ones once)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The Hugging Face model's state_dict (tensors share storage with the engine)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the given tensors into the parameters of the same state_dict names, in place.

        Tensors are converted to the engine's dtype and device; names not in
        the state_dict and shape mismatches are errors. Parameters not named
        keep their values, so an update may arrive in several calls.
        """
        ...

    def weights_checksum(self) -> str:
        """``tensors_checksum(self.named_parameters())``: identifies the loaded weights."""
        ...


def tensors_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Deterministic hex digest (SHA-256) of names, dtypes, shapes and raw bytes of tensors.

    Tensors are hashed in sorted name order, so iteration order does not
    matter. The bytes are those of the tensors' own dtype: a bf16 copy and a
    float32 copy of the same weights have different checksums, so a learner
    comparing with a rollout engine must cast to the engine's dtype first.
    Cost is one pass over the bytes (plus a device-to-host copy for GPU
    tensors): SHA-256 runs at about 2 GB/s on CPUs with SHA instructions
    (0.5 GB/s without), so 1M float32 parameters take a few milliseconds and
    100M (400 MB) about 0.2-0.8 s.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        header = f"{name}|{flat.dtype}|{tuple(tensor.shape)};"
        digest.update(header.encode())
        # A uint8 view exposes the raw bytes of any dtype, bf16 included.
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()
