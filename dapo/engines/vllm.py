"""The vLLM inference engine (GPU pods): ``InferenceEngine`` over ``vllm.LLM``.

Written against vLLM 0.30 (the ``vllm`` extra pins ``>=0.28,<0.31``) and its
V1 engine. This module is imported only when ``rollout.engine == "vllm"``;
vLLM itself is imported inside ``VLLMEngine.__init__``, so importing the
module needs no vLLM. The vLLM-free logic lives in ``vllm_support``.

Generation: token-id prompts, ``logprobs=0`` (the sampled token's log-prob),
our EOS ids as ``stop_token_ids``, no detokenisation, no tokenizer in vLLM
(``skip_tokenizer_init``), HF generation-config defaults ignored
(``generation_config="vllm"``) so no hidden penalty or top-k changes the
distribution. ``logprobs_mode`` is engine-wide; ``vllm_support`` explains
which mode matches our definition for which sampling settings, and
``strict_logprobs`` makes a mismatching ``generate`` call an error.

Weights: the ``WeightReceiver`` fills flat buckets in this process and calls
``load_weights`` with (HF name, view) pairs. They are renamed for vLLM, split
into chunks of at most ``load_chunk_mb`` and handed to every vLLM worker via
``LLM.collective_rpc`` to ``DapoWorkerExtension.dapo_load_weights`` (mixed into
vLLM's worker by ``worker_extension_cls``), which calls the model's own
``load_weights``: it copies in place (CUDA graphs stay valid), stacks q/k/v and
gate/up, shards for tensor parallelism and casts dtypes. With ``in_process``
and one GPU the engine core and its worker live in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the views reach ``load_weights``
without a copy; otherwise each chunk travels to the worker processes as CPU
tensors. Loading happens inside ``GenerationGate.updating``: it waits for the
running ``generate`` to finish and holds new ones back, so each sample comes
from exactly one policy version; the prefix cache (KV of the old weights) is
reset before generation resumes.

In-flight updates are not implemented here yet: ``generate`` calls its
``between_steps`` once, before it submits its requests, so an update that
arrives while vLLM generates waits for the next ``generate`` call (the caller's
batch boundary). A real in-flight update, pausing vLLM's scheduler between
steps and loading the weights under it, is later work; until then a long vLLM
generation misses the updates broadcast meanwhile.

``weights_checksum`` hashes vLLM's own parameters (vLLM names, stacked and
sharded layout): it identifies the loaded weights among vLLM engines of the
same model and parallelism, and is not comparable with ``HFEngine``'s. The
receiver's reported checksum (over the received buffers) is the one the
learner compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from dapo.engines.base import BetweenSteps, Completion, tensors_checksum
from dapo.engines.hf import EosSource, resolve_eos_token_ids
from dapo.engines.vllm_settings import VLLMSettings
from dapo.engines.vllm_support import (
    GenerationGate,
    LogprobsMode,
    RawSample,
    check_against_specs,
    choose_logprobs_mode,
    chunk_by_bytes,
    logprobs_exact,
    meta_named_parameters,
    plan_requests,
    regroup,
    to_vllm_weights,
    vllm_memory_fraction,
    vllm_sampling_kwargs,
)
from proto.messages import SamplingParams

EXTENSION_CLS = "dapo.engines.vllm.DapoWorkerExtension"
MIB = 1 << 20
GIB = 1 << 30


class DapoWorkerExtension:
    """Methods mixed into each vLLM GPU worker; called through ``LLM.collective_rpc``.

    ``self.model_runner`` is the worker's model runner (vLLM attribute).
    """

    def dapo_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Loads HF-named tensors with the model's ``load_weights``; returns how many were given."""
        model = self.model_runner.model
        model.load_weights(weights=iter(named_tensors))
        return len(named_tensors)

    def dapo_weights_checksum(self) -> str:
        return tensors_checksum(self.model_runner.model.named_parameters())


def _generation_config(model_dir: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the EOS must come from elsewhere
        return None


def _sampled_logprobs(output: Any) -> list[dict[int, float]] | None:
    """vLLM's per-position {token_id: Logprob} entries as plain {token_id: float}."""
    if output.logprobs is None:
        return None
    return [{int(k): float(v.logprob) for k, v in entry.items()} for entry in output.logprobs]


def _raw_samples(request_output: Any) -> list[RawSample]:
    ordered = sorted(request_output.outputs, key=lambda c: c.index)
    return [RawSample(list(c.token_ids), _sampled_logprobs(c), c.finish_reason) for c in ordered]


class VLLMEngine:
    """``InferenceEngine`` over ``vllm.LLM`` (see the module doc).

    ``model``: HF model directory (a checkpoint works). ``eos``: a tokenizer,
    explicit EOS id(s) or None (generation config), as for ``HFEngine``.
    ``dtype``: vLLM's compute dtype ("auto" = vLLM picks from the checkpoint's config).
    ``engine_kwargs`` go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        eos: EosSource = None,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        strict_logprobs: bool = True,
        enforce_eager: bool = False,
        in_process: bool = True,
        load_chunk_mb: float = 256.0,
        gate_timeout_s: float | None = 600.0,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoConfig

        model_dir = str(model)
        config = AutoConfig.from_pretrained(model_dir)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self._meta = meta_named_parameters(config)
        self._shapes = {name: tuple(t.shape) for name, t in self._meta}
        self.eos_token_ids = resolve_eos_token_ids(eos, _generation_config(model_dir))
        self.logprobs_mode, self.strict_logprobs = logprobs_mode, strict_logprobs
        self.load_chunk_bytes = int(load_chunk_mb * MIB)
        self.gate, self.gate_timeout_s = GenerationGate(), gate_timeout_s
        self.direct = in_process and tensor_parallel_size == 1
        if in_process:
            # Read when the engine is created: engine core (and a TP=1 worker) in this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm

        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_dir,
            skip_tokenizer_init=True,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode=logprobs_mode,
            generation_config="vllm",
            enable_prefix_caching=True,
            worker_extension_cls=EXTENSION_CLS,
            **(engine_kwargs or {}),
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        between_steps: BetweenSteps | None = None,
    ) -> list[list[Completion]]:
        """For each prompt, ``params.n`` completions (see ``InferenceEngine.generate``).

        ``between_steps`` runs once, before the requests are submitted (module doc): an
        update it loads is recorded at token 0 of every completion.
        """
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{i}] is empty: generation needs at least one token")
        if self.strict_logprobs and not logprobs_exact(self.logprobs_mode, params):
            raise ValueError(
                f"vLLM logprobs_mode={self.logprobs_mode!r} does not give our log-probs for "
                f"temperature={params.temperature}, top_p={params.top_p}, top_k={params.top_k}; "
                "use top_p=1/top_k=-1 or temperature 1, or strict_logprobs=False when the "
                "learner recomputes them"
            )
        plans = plan_requests(len(prompts), params)
        sampling = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(params, plan, self.eos_token_ids))
            for plan in plans
        ]
        inputs = [{"prompt_token_ids": [int(t) for t in prompts[p.prompt_index]]} for p in plans]
        # Outside the gate: the callback's load_weights waits for running generations.
        version = between_steps() if between_steps is not None else None
        with self.gate.generating(self.gate_timeout_s):
            outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        raw = [_raw_samples(o) for o in outputs]
        groups = regroup(plans, raw, len(prompts), params, self.eos_token_ids)
        if version is None:
            return groups
        updates = ((0, version),)
        return [[dataclasses.replace(c, weight_updates=updates) for c in g] for g in groups]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names with meta tensors (shapes only): vLLM holds the weights in its own layout."""
        return iter(self._meta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "VLLMEngine keeps its weights inside vLLM in stacked/sharded form; there is no HF "
            "state_dict sharing storage with it (use named_parameters for names and shapes)"
        )

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF-named tensors into vLLM (module doc); unknown names / wrong shapes raise."""
        named = to_vllm_weights(named_tensors, tie_word_embeddings=self.tie_word_embeddings)
        check_against_specs(named, self._shapes)
        chunks = chunk_by_bytes(named, self.load_chunk_bytes)
        with self.gate.updating(self.gate_timeout_s):
            for chunk in chunks:
                payload = chunk if self.direct else [(n, t.detach().cpu()) for n, t in chunk]
                self.llm.collective_rpc("dapo_load_weights", args=(payload,))
            if self.llm.reset_prefix_cache() is False:
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")

    def weights_checksum(self) -> str:
        """SHA-256 over vLLM's own parameters on every worker (see the module doc)."""
        with self.gate.generating(self.gate_timeout_s):
            digests = self.llm.collective_rpc("dapo_weights_checksum")
        if len(digests) == 1:
            return digests[0]
        return hashlib.sha256("|".join(digests).encode()).hexdigest()

    def close(self) -> None:
        """Drops the vLLM engine and frees its GPU memory."""
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_vllm_engine(spec, model_dir: Path, start_dir: Path, vs: VLLMSettings) -> VLLMEngine:
    """The rollout service's vLLM engine for run ``spec``: weights from ``start_dir`` (the base
    model, or the newest checkpoint for a worker joining late), tokenizer and shapes from
    ``model_dir``; pod-level knobs from ``vs``."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer_path or str(model_dir))
    fraction = vs.gpu_memory_utilization
    if fraction == 0.0:
        numel = sum(
            t.numel() for _, t in meta_named_parameters(AutoConfig.from_pretrained(model_dir))
        )
        reserve = numel * getattr(torch, spec.model.dtype).itemsize + GIB  # receiver buffers
        fraction = vllm_memory_fraction(torch.cuda.get_device_properties(0).total_memory, reserve)
    recomputed = not spec.algorithm.rollout_correction.uses_behavior_log_probs
    return VLLMEngine(
        start_dir, tokenizer,
        dtype=spec.rollout.dtype if vs.dtype == "auto" else vs.dtype,
        tensor_parallel_size=vs.tensor_parallel_size,
        gpu_memory_utilization=fraction,
        max_model_len=vs.max_model_len or spec.data.max_prompt_length + spec.data.max_response_length,
        logprobs_mode=choose_logprobs_mode(spec.rollout.temperature),
        strict_logprobs=not recomputed,
        enforce_eager=vs.enforce_eager, in_process=vs.in_process,
        load_chunk_mb=vs.load_chunk_mb, gate_timeout_s=vs.gate_timeout_s,
    )  # fmt: skip
