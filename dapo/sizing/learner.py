"""Memory of the learner: per GPU (one FSDP rank) and per host (one torchrun node).

Notation: P parameters, W ranks (learner GPUs), b_m bytes per element of ``model.dtype``
(the master weights, their gradients and the AdamW state), b_c of the compute dtype (2
under bf16 mixed precision, else b_m), h hidden, q = a * d query width, kv = k * d key /
value width, i intermediate, V vocabulary, L layers. A micro-batch is B =
``actor.ppo_micro_batch_size`` rows of S = prompt + response tokens (right-padded to the
longest) of which T are response positions. See services/learner/{model_init, trainer,
logprobs, batching}.py for what these formulas count.
"""

from __future__ import annotations

from dapo.sizing.shapes import ModelShape

LOGPROB_CHUNK = 512
"""Response positions per head chunk (``services.learner.logprobs.CHUNK``)."""
LOAD_BATCH_BYTES = 1 << 30
"""Weights rank 0 reads at a time at start (``services.learner.model_init``)."""
FP32 = 4


def sharded_state_bytes(params: int, world: int, master_bytes: int) -> dict[str, float]:
    """Parameters, gradients and AdamW's two moments, each in ``model.dtype`` and split
    evenly over the W ranks by FSDP2 (``fully_shard``): P * b_m / W each, so 4 P b_m / W in
    all (16 P / W bytes in float32)."""
    shard = params * master_bytes / world
    return {"params": shard, "grads": shard, "optimizer": 2 * shard}


def gathered_bytes(model: ModelShape, world: int, gather_bytes: int) -> float:
    """Unsharded parameters while a rank computes. Sharded (W > 1): FSDP2 all-gathers a layer
    before its forward and backward and prefetches the next, so two layers are whole at
    once, in the gather dtype (bf16 under mixed precision); the root module (embedding,
    final norm, head) stays gathered from the first forward to the end of backward:
    (2 layer_params + embedding (+ head)) * b_g. Unsharded gradients are reduce-scattered
    layer by layer in float32: one layer's (layer_params * 4). One process (W = 1) gathers
    nothing, but bf16 autocast caches a bf16 copy of every weight it casts during a
    forward: P * 2 when b_g is 2, else nothing."""
    if world == 1:
        return float(model.num_params() * gather_bytes) if gather_bytes < FP32 else 0.0
    root = model.embedding_params() * (1 if model.tie_word_embeddings else 2)
    return float((2 * model.layer_params() + root) * gather_bytes + model.layer_params() * FP32)


def layer_activation_bytes_per_token(model: ModelShape, compute_bytes: int) -> float:
    """What one decoder layer keeps for backward, per token. Its two RMSNorms compute in
    float32 and keep their input and normalised value (2 h * 4 each: 16 h). In compute dtype:
    the attention's input (h), the rotated queries and keys (q + kv), the values (kv), the
    attention output and the o-projection's input (2 q); the MLP's input (h), gate, up,
    silu(gate) and their product (4 i): b_c (2 h + 3 q + 2 kv + 4 i). Attention is SDPA
    (flash / memory-efficient kernels): no (S, S) score matrix is kept."""
    h, q, kv, i = model.hidden_size, model.q_dim, model.kv_dim, model.intermediate_size
    return 16 * h + compute_bytes * (2 * h + 3 * q + 2 * kv + 4 * i)


def activation_bytes(
    model: ModelShape,
    tokens: int,
    response_tokens: int,
    residual_bytes: int,
    compute_bytes: int,
    checkpointing: bool,
) -> float:
    """Activations one micro-batch keeps from its forward for its backward: ``tokens`` =
    B * S positions, ``response_tokens`` = B * T of them predicted. Without checkpointing
    every layer keeps its share: L * tokens * layer_activation_bytes_per_token. With
    ``model.enable_gradient_checkpointing`` each layer keeps only its input (h * b_s, b_s the
    residual stream's bytes: bf16 when FSDP2 casts the parameters, else model.dtype, since
    autocast leaves the embedding and the residual additions alone). Either way the head's
    inputs stay: the final norm's input and output (2 h * 4 per token) and the gathered
    response states (h * 4 per response token)."""
    h = model.hidden_size
    if checkpointing:
        body = tokens * model.num_layers * h * residual_bytes
    else:
        body = model.num_layers * tokens * layer_activation_bytes_per_token(model, compute_bytes)
    return float(body + tokens * 2 * h * FP32 + response_tokens * h * FP32)


def transient_bytes(
    model: ModelShape, tokens: int, head_chunk: float, compute_bytes: int, checkpointing: bool
) -> float:
    """The largest short-lived block on top of the kept activations: the head's chunk at the
    end of the forward (``head_chunk_bytes``), or a layer's backward, which holds the
    gradients of that layer's activations as it consumes them (about one layer's share)
    and, with checkpointing, the layer's recomputed activations besides (twice that)."""
    layer = tokens * layer_activation_bytes_per_token(model, compute_bytes)
    return float(max(head_chunk, layer * (2 if checkpointing else 1)))


def head_chunk_bytes(
    rows: int, resp: int, vocab: int, compute_bytes: int, chunk: int = LOGPROB_CHUNK
) -> float:
    """The chunked log-prob head (``services.learner.logprobs``): one chunk of B rows x c
    positions (c = min(chunk, T)) x V at a time. Its peak, computing the entropy metric, holds the logits (b_c),
    their float32 copy (4, none when b_c is 4 already), the log-softmax (4) and, for the
    entropy, its exp, the clamped copy and their product (3 * 4): B c V (b_c + 20) bytes,
    (B c V) 20 in float32. Backward recomputes the chunk and holds fewer."""
    upcast = compute_bytes if compute_bytes < FP32 else 0
    return float(rows * min(chunk, resp) * vocab * (upcast + 5 * FP32))


def packed_batch_bytes(rows: int, seq: int, resp: int) -> float:
    """The training batch as tensors on the host (``services.learner.batching.PackedSamples``,
    every rank packs the whole batch): per row input_ids and attention_mask (S int64 each:
    16 S), resp_pos, resp_ids, versions (T int64 each), mask and behaviour log-probs (T
    float32 each): 32 T; then the recomputed proximal log-probs, importance weights and
    the all-reduce's result (T float32 each: 12 T). rows (16 S + 44 T)."""
    return float(rows * (16 * seq + 44 * resp))


def host_rank_bytes(batch_bytes: float, packed: float, rank0: bool) -> float:
    """One rank's share of its node's host memory while it trains. Every rank holds the
    decoded batch (its arrays are views of the received bytes: one copy) and the packed
    tensors; rank 0 also holds the Redis reply it decoded and the encoded copy it sends to
    the other ranks (``Policy.train_batch``): 3 copies instead of 1."""
    return (3 if rank0 else 1) * batch_bytes + packed


def host_rank0_extra_bytes(model: ModelShape, master_bytes: int) -> float:
    """Rank 0's passing needs: at start it reads the weight files ``LOAD_BATCH_BYTES`` at a
    time; a checkpoint's Hugging Face export streams one whole parameter at a time to it, the
    largest being the embedding (V h b_m). The larger of the two."""
    return float(max(LOAD_BATCH_BYTES, model.embedding_params() * master_bytes))
