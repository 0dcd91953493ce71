"""Response log-probs (and entropies) without full-vocabulary copies of the sequence.

``model(...)`` returns logits (B, S, V) for every position; gathering the response
positions (B, T, V), upcasting them, dividing by the temperature and taking a
log-softmax keeps several (B, T, V) float32 tensors alive at once: each about 25 GB
for two 20k-token answers with Qwen2.5's 152k-token vocabulary. Here the decoder body
gives the hidden states (B, S, H), the response positions are gathered (B, T, H) and
the head runs on ``chunk`` positions at a time: logits (B, c, V) -> float32 ->
/ temperature -> log_softmax -> the sampled token's log-prob and the entropy. With
gradients each chunk is checkpointed (recomputed during backward), so only its (B, c, H)
input is kept and the peak is O(B * c * V) whatever T is. Values are those of the full
path (same ops on the same numbers, one chunk at a time).

The head must be a plain ``lm_head(hidden)`` (Qwen2, Llama, Mistral); a model that
scales or soft-caps its logits is refused rather than given different numbers.

Under FSDP2 the hooks of ``model.forward`` gather the root's parameters (embeddings,
final norm, head) and register the backward; this computation is not ``forward``, so it
is registered as a forward method of the root (``register_fsdp_forward_method``), which
runs the same hooks around it.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

CHUNK = 512
"""Response positions per head chunk: (B, 512, V) float32 logits at a time."""
_METHOD = "dapo_response_log_probs"
_SCALED_HEADS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    resp_pos: torch.Tensor,
    resp_ids: torch.Tensor,
    *,
    temperature: float,
    chunk: int = CHUNK,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(resp_ids) (B, T) at ``temperature`` and, with ``with_entropy``, the entropy
    (B, T) of each position's distribution (carrying a gradient only with
    ``entropy_grad``). input_ids, attention_mask (B, S); resp_pos, resp_ids (B, T): the
    position whose logits predict response token t, and that token."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_plain_head(model)
    args = (input_ids, attention_mask, resp_pos, resp_ids)
    opts = {"temperature": temperature, "chunk": chunk, "with_entropy": with_entropy}
    opts["entropy_grad"] = entropy_grad
    if not isinstance(model, FSDPModule):
        return _forward(model, *args, **opts)
    if not hasattr(model, _METHOD):  # once per model: the root's FSDP hooks around it
        setattr(model, _METHOD, functools.partial(_forward, model))
        register_fsdp_forward_method(model, _METHOD)
    return getattr(model, _METHOD)(*args, **opts)


def _check_plain_head(model: torch.nn.Module) -> None:
    cfg = getattr(model, "config", None)
    for name in _SCALED_HEADS:
        if getattr(cfg, name, None) not in (None, 1.0):
            raise ValueError(
                f"{type(model).__name__} sets {name}: its logits are not lm_head(hidden), "
                "which the chunked log-prob head computes"
            )


def _forward(
    model,
    input_ids,
    attention_mask,
    resp_pos,
    resp_ids,
    *,
    temperature,
    chunk,
    with_entropy,
    entropy_grad,
):
    """The decoder body once, then the head chunk by chunk (see the module docstring)."""
    body = model.base_model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state  # (B, S, H) after the final norm
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    h = hidden[rows, resp_pos]  # (B, T, H): the states that predict each response token
    del hidden
    head = model.get_output_embeddings()
    recompute = torch.is_grad_enabled() and h.requires_grad
    logps, ents = [], []
    for start in range(0, h.shape[1], chunk):
        part = (head, h[:, start : start + chunk], resp_ids[:, start : start + chunk])
        flags = (temperature, with_entropy, entropy_grad)
        if recompute:  # keep (B, c, H) per chunk, not its (B, c, V) intermediates
            logp, ent = checkpoint(_head_chunk, *part, *flags, use_reentrant=False)
        else:
            logp, ent = _head_chunk(*part, *flags)
        logps.append(logp)
        ents.append(ent)
    entropy = torch.cat(ents, dim=1) if with_entropy else None
    return torch.cat(logps, dim=1), entropy


def _head_chunk(head, h, tokens, temperature, with_entropy, entropy_grad):
    """h (B, c, H), tokens (B, c) -> log-probs (B, c) and entropies (B, c) or None."""
    logits = head(h)  # (B, c, V) in the compute dtype
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # softmax statistics in full precision
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # (B, c, V)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, c)
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # clamp keeps 0 * log 0 at 0 instead of 0 * -inf = NaN, value and gradient alike
        finite = logp_all.clamp(min=torch.finfo(logp_all.dtype).min)
        entropy = -(logp_all.exp() * finite).sum(dim=-1)  # (B, c)
    return logp, entropy
