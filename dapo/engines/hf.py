"""The portable inference engine: a Hugging Face causal LM with its own sampling loop.

``model.generate`` is deliberately not used: the learner must be able to
recompute every recorded log-prob exactly, so this module owns the padding,
the position ids, the KV cache and the sampling step. All prompts x n samples
decode together as one left-padded batch (optionally in chunks of
``max_batch_size`` rows); each row stops at its first EOS id. The same code
runs on CPU and CUDA. See ``dapo.engines.base`` for what the recorded log-probs
mean.

In-flight updates: ``generate``'s ``between_steps`` is called before every
forward pass, each chunk's prompt pass and each decode step (all live rows
advance one token per step), so an update takes effect at the next token of
every row still generating, with the KV cache kept. Chunks decode one after
another: a chunk that starts after an update starts with the new version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dapo.engines.base import BetweenSteps, Completion, tensors_checksum
from proto.messages import SamplingParams

EosSource = int | Sequence[int] | PreTrainedTokenizerBase | None


def _as_id_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_eos_token_ids(
    source: EosSource, generation_config: GenerationConfig | None
) -> tuple[int, ...]:
    """The token ids that end a sample.

    Explicit ids (an int or a sequence) are used as given. A tokenizer
    contributes its ``eos_token_id``, joined with the generation config's
    ``eos_token_id`` (an int or a list: chat models often stop on several).
    None uses the generation config alone. Finding no id is an error.
    """
    if isinstance(source, PreTrainedTokenizerBase):
        ids = _as_id_list(source.eos_token_id)
    else:
        ids = _as_id_list(source)
    if not isinstance(source, int | Sequence) and generation_config is not None:
        ids += _as_id_list(generation_config.eos_token_id)
    if not ids:
        raise ValueError(
            "no EOS token id: pass eos ids or a tokenizer with eos_token_id, or set "
            "generation_config.eos_token_id on the model"
        )
    return tuple(dict.fromkeys(ids))  # de-duplicated, order kept


def truncate_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k / nucleus set; (B, V) -> (B, V).

    Top-k applies first; top-p then keeps, in order of decreasing probability,
    each token whose preceding mass (renormalised over the top-k survivors) is
    below ``top_p``, so the most likely token always survives. The surviving
    entries keep their values: they are sampling weights, not renormalised.
    """
    if top_k == -1 and top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)  # (B, V)
    keep = torch.ones_like(sorted_lp, dtype=torch.bool)
    if top_k != -1:
        keep[:, top_k:] = False
    if top_p < 1.0:
        probs = torch.softmax(sorted_lp.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep &= mass_before < top_p
    keep[:, 0] = True
    masked = sorted_lp.masked_fill(~keep, float("-inf"))
    return torch.full_like(logprobs, float("-inf")).scatter(-1, order, masked)


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from (B, V) logits; returns token ids (B,) and their log-probs (B,).

    The log-probs are log_softmax(logits / temperature) of the drawn token,
    before truncation (temperature 0: greedy, log-probs at temperature 1).
    """
    logits = logits.float()
    if params.temperature == 0.0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
        weights = truncate_logprobs(logprobs, params.top_k, params.top_p).exp()
        tokens = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows; returns input ids (B, P) and attention mask (B, P), 1 = real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _Decoded:
    tokens: torch.Tensor  # (B, T) sampled ids; entries after a row's EOS are padding
    logprobs: torch.Tensor  # (B, T) float32
    lengths: torch.Tensor  # (B,) response length, EOS included
    stopped: torch.Tensor  # (B,) bool: the row emitted an EOS
    updates: list[list[tuple[int, int]]]  # per row: (token index, version) of each update


class _UpdateLog:
    """The weight updates ``between_steps`` loads during one ``generate`` call, recorded per
    row of the chunk being decoded (see ``Completion.weight_updates``)."""

    def __init__(self, between_steps: BetweenSteps | None) -> None:
        self.between_steps = between_steps
        self.latest: int | None = None  # newest version loaded during this call
        self.rows: list[list[tuple[int, int]]] = []

    def start_chunk(self, batch: int) -> None:
        """A chunk starts on the newest weights: an update taken in an earlier chunk counts
        from the first token of this one's rows."""
        start = [] if self.latest is None else [(0, self.latest)]
        self.rows = [list(start) for _ in range(batch)]

    def check(self, index: int, stopped: torch.Tensor) -> None:
        """Asks for new weights before the forward pass that yields token ``index`` of every
        row not ``stopped`` (B,); the rows that finished take no more tokens, so no update."""
        if self.between_steps is None:
            return
        # Outside inference mode: what the callback creates (process groups, buffers) and
        # the parameters it writes must stay ordinary tensors after this call.
        with torch.inference_mode(False):
            version = self.between_steps()
        if version is None:
            return
        self.latest = version
        for row in (~stopped).nonzero().flatten().tolist():
            self.rows[row].append((index, version))


class HFEngine:
    """``InferenceEngine`` over a Hugging Face ``AutoModelForCausalLM``.

    ``model`` is a model directory or an already built model; ``eos`` is a
    tokenizer, explicit EOS id(s), or None (see ``resolve_eos_token_ids``).
    ``dtype`` None keeps a given model's dtype and loads a directory in
    float32. ``max_batch_size`` bounds the rows (prompts x n) decoded together.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | PreTrainedModel,
        eos: EosSource = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if isinstance(model, str | os.PathLike):
            model = AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype or torch.float32, attn_implementation=attn_implementation
            )
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.eos_token_ids = resolve_eos_token_ids(eos, model.generation_config)
        pad = model.config.pad_token_id if hasattr(model.config, "pad_token_id") else None
        # Any valid id works for padding: padded positions are masked out.
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.max_batch_size = max_batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        between_steps: BetweenSteps | None = None,
    ) -> list[list[Completion]]:
        """For each prompt, ``params.n`` completions (see ``InferenceEngine.generate``).

        Rows are prompt-major (prompt i, sample j). With a seed the result is
        deterministic for the same prompts, params, batch chunking, device and
        weights (updates included: an update that loads nothing changes nothing).
        ``between_steps`` runs before every forward pass (module doc).
        """
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{i}] is empty: generation needs at least one token")
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        chunk = self.max_batch_size or max(len(rows), 1)
        updates = _UpdateLog(between_steps)
        flat: list[Completion] = []
        for start in range(0, len(rows), chunk):
            decoded = self._decode(rows[start : start + chunk], params, generator, updates)
            flat.extend(self._to_completions(decoded))
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _decode(
        self,
        rows: Sequence[Sequence[int]],
        params: SamplingParams,
        generator: torch.Generator,
        updates: _UpdateLog,
    ) -> _Decoded:
        """The sampling loop for one batch of rows, with a KV cache that outlives updates."""
        input_ids, mask = left_pad(rows, self.pad_token_id, self.device)  # (B, P)
        batch = input_ids.shape[0]
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        updates.start_chunk(batch)
        updates.check(0, stopped)
        # Real tokens get positions 0, 1, ...; padding is clamped to 0 and masked anyway.
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, P)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = positions[:, -1:] + 1  # (B, 1)
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        lengths = torch.full((batch,), params.max_new_tokens, device=self.device)
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        for step in range(params.max_new_tokens):
            token, logprob = sample_next_token(out.logits[:, -1, :], params, generator)
            token = token.masked_fill(stopped, self.pad_token_id)  # finished rows idle
            tokens.append(token)
            logprobs.append(logprob)
            hit = torch.isin(token, eos) & ~stopped
            lengths = torch.where(hit, step + 1, lengths)
            stopped |= hit
            if step + 1 == params.max_new_tokens or bool(stopped.all()):
                break
            updates.check(step + 1, stopped)  # new weights, if any, sample token step + 1 on
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)  # (B, P + step + 1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1
        return _Decoded(
            torch.stack(tokens, 1), torch.stack(logprobs, 1), lengths, stopped, updates.rows
        )

    @staticmethod
    def _to_completions(decoded: _Decoded) -> list[Completion]:
        tokens = decoded.tokens.cpu().numpy().astype(np.int32)
        logprobs = decoded.logprobs.cpu().numpy().astype(np.float32)
        lengths = decoded.lengths.cpu().tolist()
        stopped = decoded.stopped.cpu().tolist()
        return [
            Completion(
                token_ids=tokens[b, :length].copy(),
                logprobs=logprobs[b, :length].copy(),
                finish_reason="stop" if stopped[b] else "length",
                weight_updates=tuple(decoded.updates[b]),
            )
            for b, length in enumerate(lengths)
        ]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the state_dict entries of the same names (cast to dtype/device)."""
        targets = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in targets:
                    raise KeyError(f"load_weights: the model has no parameter named {name!r}")
                target = targets[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor)

    def weights_checksum(self) -> str:
        """SHA-256 over the parameters' raw bytes (see ``engine.tensors_checksum``)."""
        return tensors_checksum(self.model.named_parameters())
