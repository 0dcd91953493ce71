"""The vLLM-free half of the vLLM rollout engine: pure functions, the log of a
generation's requests and a thread gate; ``dapo.engines.vllm`` wires them to vLLM 0.32.

Parameter names. The learner sends Hugging Face names. vLLM's ``load_weights`` of
Qwen2/Llama-style models takes exactly those: it stacks q/k/v into ``qkv_proj`` and gate/up
into ``gate_up_proj`` (the model's ``packed_modules_mapping``), shards and casts.
``to_vllm_weights`` only removes the components training wrappers insert (``_orig_mod``
of torch.compile, FSDP1's ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, DDP's
leading ``module.``) and drops a tied ``lm_head.weight`` (vLLM shares the embedding).
vLLM 0.32 reloads layer by layer and rebuilds a layer from whatever part of it it is
given, so ``check_whole_layers`` refuses q_proj without k_proj and v_proj, gate_proj
without up_proj. ``to_hf_weights`` maps vLLM's parameters back (fused ones split, padded
vocabulary rows cut) to compare them bit for bit with the learner's.

Log-probs (ours: log_softmax(logits / T) before top-p/top-k, see ``engine``). vLLM's
``logprobs_mode`` is engine-wide: ``raw_logprobs`` (before temperature and truncation)
equals ours at T == 1, any top-p/top-k, and for greedy decoding; ``processed_logprobs``
(after temperature and truncation, renormalised over the kept tokens) equals ours when
nothing is truncated, any T, and greedy. No mode gives T != 1 with truncation;
``logprobs_exact`` names the combinations that match.

Finish reasons. vLLM checks the length cap before the stop tokens, so a sample whose last
allowed token is an EOS comes back as ``"length"``; ours calls it ``"stop"``. ``"abort"``
(or none: unfinished) is an error: such a sample has no valid length.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dapo.engines.base import Completion
from proto.messages import SamplingParams

WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
LEADING_WRAPPERS = ("module",)  # DDP; only as the first component
TIED_HEAD = "lm_head.weight"
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
NamedTensor = tuple[str, torch.Tensor]


# ---------------------------------------------------------------- parameter names


def canonical_name(name: str) -> str:
    """The Hugging Face name under training wrappers: wrapper components removed."""
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    while parts and parts[0] in LEADING_WRAPPERS:
        parts.pop(0)
    if not parts or any(not p for p in parts):
        raise ValueError(f"parameter name {name!r} is empty or malformed after unwrapping")
    return ".".join(parts)


def to_vllm_weights(
    named_tensors: Iterable[NamedTensor], *, tie_word_embeddings: bool
) -> list[NamedTensor]:
    """(name, tensor) pairs as vLLM's ``load_weights`` takes them (see module doc)."""
    out: list[NamedTensor] = []
    seen: dict[str, str] = {}
    for raw, tensor in named_tensors:
        name = canonical_name(raw)
        if tie_word_embeddings and name == TIED_HEAD:
            continue
        if name in seen:
            raise ValueError(f"parameters {seen[name]!r} and {raw!r} both map to {name!r}")
        seen[name] = raw
        out.append((name, tensor))
    return out


def check_against_specs(
    named_tensors: Iterable[NamedTensor], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Unknown names are a KeyError, wrong shapes a ValueError (as ``HFEngine.load_weights``)."""
    for name, tensor in named_tensors:
        if name not in shapes:
            raise KeyError(f"load_weights: the model has no parameter named {name!r}")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(
                f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(shapes[name])}"
            )


def meta_named_parameters(config: Any) -> list[NamedTensor]:
    """The HF model's (name, meta tensor) parameters for ``config``: names and shapes, no memory.

    Tied parameters appear once (``lm_head.weight`` is absent when tied), as
    in the learner's ``named_parameters()``.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(model.named_parameters())


def _layer_of(name: str, fused: Mapping[str, str]) -> str:
    """The vLLM module that holds HF parameter ``name`` (``fused``: q_proj -> qkv_proj, ...)."""
    module = name.rpartition(".")[0]
    head, _, last = module.rpartition(".")
    last = fused.get(last, last)
    return f"{head}.{last}" if head else last


def check_whole_layers(
    names: Iterable[str], all_names: Iterable[str], packed: Mapping[str, Sequence[str]]
) -> None:
    """Refuses an update that names part of a vLLM layer: vLLM rebuilds each layer it is
    given anything of from what it is given (module doc). ``packed``: the model's
    ``packed_modules_mapping`` (qkv_proj -> [q_proj, k_proj, v_proj], ...)."""
    fused = {sub: whole for whole, subs in packed.items() for sub in subs}
    members: dict[str, set[str]] = defaultdict(set)
    for name in all_names:
        members[_layer_of(name, fused)].add(name)
    given = set(names)
    for layer in sorted({_layer_of(name, fused) for name in given}):
        if missing := sorted(members[layer] - given):
            raise ValueError(
                f"load_weights: vLLM reloads whole layers; {layer!r} also needs {missing}"
            )


def to_hf_weights(
    named_tensors: Iterable[NamedTensor],
    packed: Mapping[str, Sequence[str]],
    output_sizes: Mapping[str, Sequence[int]],
    shapes: Mapping[str, tuple[int, ...]],
) -> list[NamedTensor]:
    """vLLM's parameters (one unsharded copy) under the HF names of ``shapes``, in its order.

    A fused parameter (``qkv_proj``, ``gate_up_proj``: the modules in ``packed``) is split
    along dim 0 by its module's ``output_sizes``; rows beyond the HF shape (vLLM pads the
    vocabulary) are cut. vLLM parameters with no HF name (a tied head) are left out.
    """
    found: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        module, _, leaf = name.rpartition(".")
        head, _, last = module.rpartition(".")
        if last not in packed:
            found[name] = tensor
            continue
        parts = tensor.split(list(output_sizes[module]), dim=0)
        for sub, part in zip(packed[last], parts, strict=True):
            found[f"{head}.{sub}.{leaf}"] = part
    out = []
    for name, shape in shapes.items():
        if name not in found:
            raise KeyError(f"vLLM holds no parameter for {name!r}")
        tensor = found[name]
        if tensor.shape[0] > shape[0] and tuple(tensor.shape[1:]) == tuple(shape[1:]):
            tensor = tensor[: shape[0]]  # padded vocabulary rows
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"vLLM's {name!r} has shape {tuple(tensor.shape)}, HF {shape}")
        out.append((name, tensor))
    return out


# ---------------------------------------------------------------- chunks and memory


def chunk_by_bytes(named_tensors: Sequence[NamedTensor], max_bytes: int) -> list[list[NamedTensor]]:
    """Consecutive groups of at most ``max_bytes`` each (a bigger tensor forms its own group).

    Order is kept. Any two neighbouring groups together exceed ``max_bytes``,
    so there are at most ``2 * total / max_bytes + 1`` groups.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    chunks: list[list[NamedTensor]] = []
    current: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def vllm_memory_fraction(
    total_bytes: int, reserve_bytes: int, target: float = 0.9, floor: float = 0.2
) -> float:
    """vLLM's ``gpu_memory_utilization`` leaving ``reserve_bytes`` (e.g. sync buffers) free."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, got {total_bytes}")
    fraction = target - reserve_bytes / total_bytes
    if fraction < floor:
        raise ValueError(
            f"the GPU ({total_bytes / 2**30:.1f} GiB) cannot hold vLLM plus "
            f"{reserve_bytes / 2**30:.1f} GiB reserved: {fraction:.2f} of memory would be left "
            f"for vLLM (minimum {floor})"
        )
    return fraction


# ---------------------------------------------------------------- sampling


def choose_logprobs_mode(temperature: float) -> LogprobsMode:
    """The engine-wide mode that matches ours for a run's rollout temperature."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def logprobs_exact(mode: LogprobsMode, params: SamplingParams) -> bool:
    """Whether vLLM's log-probs in ``mode`` equal ours for ``params`` (module doc)."""
    if params.temperature == 0.0:
        return True
    if mode == "raw_logprobs":
        return params.temperature == 1.0
    return params.top_p >= 1.0 and params.top_k == -1


@dataclass(frozen=True)
class RequestPlan:
    """One vLLM request: one sample of prompt ``prompt_index``, drawn with ``seed``."""

    prompt_index: int
    seed: int | None


def plan_requests(num_prompts: int, params: SamplingParams) -> list[RequestPlan]:
    """Requests for one ``generate`` call, prompt-major: G requests of one sample per prompt.

    One sample per request, not one request of n = G: the engine follows each request's
    tokens step by step (to place weight updates), and vLLM fans an n > 1 request out into
    the same n requests anyway (the prefix cache shares the prompt). With a seed, sample j
    of prompt i is seeded ``seed + i * G + j``: distinct and reproducible.
    """
    return [
        RequestPlan(i, None if params.seed is None else params.seed + i * params.n + j)
        for i in range(num_prompts)
        for j in range(params.n)
    ]


def vllm_sampling_kwargs(
    params: SamplingParams, plan: RequestPlan, eos_token_ids: Collection[int]
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one planned request."""
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": 0 if params.top_k == -1 else params.top_k,  # vLLM: 0 disables top-k
        "max_tokens": params.max_new_tokens,
        "seed": plan.seed,
        "logprobs": 0,  # the sampled token's log-prob only
        "stop_token_ids": sorted(int(t) for t in eos_token_ids),
        "ignore_eos": False,
        "detokenize": False,  # token ids are all we need
    }


# ---------------------------------------------------------------- outputs


class GenerationAborted(RuntimeError):
    """vLLM returned a sample that did not finish (aborted or unfinished)."""


@dataclass(frozen=True)
class RawSample:
    """One vLLM completion as plain data.

    ``logprobs[t]`` is the sampled token's log-prob, or a {token_id: logprob}
    mapping holding it (vLLM may add top-ranked tokens); None = not returned.
    ``weight_updates``: as ``Completion.weight_updates``.
    """

    token_ids: Sequence[int]
    logprobs: Sequence[float | Mapping[int, float]] | None
    finish_reason: str | None
    weight_updates: tuple[tuple[int, int], ...] = ()


def _sampled_logprobs(sample: RawSample) -> np.ndarray:
    if sample.logprobs is None:
        raise ValueError("the sample carries no log-probs (request them with logprobs=0)")
    if len(sample.logprobs) != len(sample.token_ids):
        raise ValueError(
            f"{len(sample.logprobs)} log-prob entries for {len(sample.token_ids)} tokens"
        )
    values = []
    for t, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs, strict=True)):
        if isinstance(entry, Mapping):
            if token not in entry:
                raise ValueError(
                    f"position {t}: the log-probs do not include sampled token {token}"
                )
            entry = entry[token]
        value = float(entry)
        if not math.isfinite(value) or value > 1e-4:
            raise ValueError(f"position {t}: {value} is not the log-prob of a drawn token")
        values.append(value)
    return np.asarray(values, dtype=np.float32)


def to_completion(
    sample: RawSample, eos_token_ids: Collection[int], max_new_tokens: int
) -> Completion:
    """Our ``Completion`` for one vLLM sample (finish-reason rules in the module doc).

    A ``"length"`` sample may be shorter than ``max_new_tokens`` when it ran
    into the model's context length.
    """
    if sample.finish_reason not in ("stop", "length"):
        raise GenerationAborted(f"sample finished with reason {sample.finish_reason!r}")
    tokens = np.asarray(list(sample.token_ids), dtype=np.int64)
    if tokens.size == 0 or tokens.size > max_new_tokens:
        raise ValueError(f"{tokens.size} tokens, expected 1..{max_new_tokens}")
    hits = np.flatnonzero(np.isin(tokens, list(eos_token_ids)))
    if hits.size and hits[0] != tokens.size - 1:
        raise ValueError(f"EOS at position {hits[0]} of {tokens.size}: tokens after the EOS")
    ended_by_eos = bool(hits.size)
    if sample.finish_reason == "stop" and not ended_by_eos:
        raise ValueError(f"'stop' without a final EOS ({sorted(eos_token_ids)}): a stop string?")
    return Completion(
        token_ids=tokens.astype(np.int32),
        logprobs=_sampled_logprobs(sample),
        finish_reason="stop" if ended_by_eos else "length",
        weight_updates=sample.weight_updates,
    )


class RequestLog:
    """The requests of one ``generate`` call as vLLM steps them: tokens and log-probs as
    they arrive (vLLM's DELTA outputs), finish reasons, and the weight updates taken
    between steps, each at the token index every unfinished request had reached."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        self.ids = list(request_ids)
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        self._tokens: list[list[int]] = [[] for _ in self.ids]
        self._logprobs: list[list | None] = [[] for _ in self.ids]
        self._finish: list[str | None] = [None] * len(self.ids)
        self._updates: list[list[tuple[int, int]]] = [[] for _ in self.ids]

    def absorb(self, request_id: str, token_ids, logprobs, finish_reason: str | None) -> None:
        """One step's new tokens of a request (``logprobs`` None: vLLM returned none)."""
        row = self._row[request_id]
        self._tokens[row].extend(int(t) for t in token_ids)
        if logprobs is None or self._logprobs[row] is None:
            self._logprobs[row] = None
        else:
            self._logprobs[row].extend(logprobs)
        self._finish[row] = finish_reason

    def record_update(self, version: int) -> None:
        """New weights from the next token of every unfinished request on."""
        for row, reason in enumerate(self._finish):
            if reason is None:
                self._updates[row].append((len(self._tokens[row]), version))

    @property
    def unfinished(self) -> list[str]:
        return [rid for rid, reason in zip(self.ids, self._finish, strict=True) if reason is None]

    def samples(self) -> list[RawSample]:
        """One ``RawSample`` per request, in request order (updates past the end dropped)."""
        return [
            RawSample(tokens, lps, reason, tuple((i, v) for i, v in ups if i < len(tokens)))
            for tokens, lps, reason, ups in zip(
                self._tokens, self._logprobs, self._finish, self._updates, strict=True
            )
        ]


def regroup(
    plans: Sequence[RequestPlan],
    samples: Sequence[RawSample],
    num_prompts: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
) -> list[list[Completion]]:
    """Per prompt, its ``params.n`` completions, from one sample per planned request."""
    if len(samples) != len(plans):
        raise ValueError(f"{len(samples)} samples for {len(plans)} requests")
    groups: list[list[Completion]] = [[] for _ in range(num_prompts)]
    for plan, sample in zip(plans, samples, strict=True):
        groups[plan.prompt_index].append(
            to_completion(sample, eos_token_ids, params.max_new_tokens)
        )
    for i, group in enumerate(groups):
        if len(group) != params.n:
            raise ValueError(f"prompt {i}: {len(group)} completions, expected {params.n}")
    return groups


# ---------------------------------------------------------------- generation gate


class GateTimeout(TimeoutError):
    """The gate could not be passed within the timeout."""


class GenerationGate:
    """Generation and weight updates exclude each other; generations share.

    States: ``open`` (generations enter freely), ``draining`` (an update
    waits: new generations are held back so the update cannot starve, running
    ones finish), ``updating`` (one update holds the weights; generations and
    other updates wait), then ``open`` again. A timed-out update withdraws, so
    held-back generations proceed. A thread inside a generation may nest
    generations; asking for an update there (or a generation inside an update)
    would deadlock and raises RuntimeError instead.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0  # generations inside
        self._waiting_updates = 0
        self._updating = False
        self._local = threading.local()

    @property
    def active(self) -> int:
        return self._active

    @property
    def state(self) -> Literal["open", "draining", "updating"]:
        with self._cond:
            if self._updating:
                return "updating"
            return "draining" if self._waiting_updates else "open"

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def generating(self, timeout_s: float | None = None) -> Iterator[None]:
        """Holds a generation slot; waits while an update is pending or running."""
        if getattr(self._local, "updating", False):
            raise RuntimeError("generation requested by the thread holding a weight update")
        with self._cond:
            if self._depth() == 0:  # nested entries must not wait for a drain they block
                free = self._cond.wait_for(
                    lambda: not self._updating and not self._waiting_updates, timeout_s
                )
                if not free:
                    raise GateTimeout(f"no generation slot within {timeout_s} s: weights updating")
            self._active += 1
        self._local.depth = self._depth() + 1
        try:
            yield
        finally:
            self._local.depth = self._depth() - 1
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def updating(self, timeout_s: float | None = None) -> Iterator[None]:
        """Holds the weights exclusively, after the running generations finished."""
        if self._depth():
            raise RuntimeError("weight update requested from inside a generation")
        with self._cond:
            self._waiting_updates += 1
            try:
                free = self._cond.wait_for(
                    lambda: not self._updating and self._active == 0, timeout_s
                )
                if not free:
                    raise GateTimeout(
                        f"weight update waited {timeout_s} s: {self._active} generations running"
                    )
                self._updating = True
            finally:
                self._waiting_updates -= 1
                self._cond.notify_all()  # on timeout, held-back generations may go
        self._local.updating = True
        try:
            yield
        finally:
            self._local.updating = False
            with self._cond:
                self._updating = False
                self._cond.notify_all()
