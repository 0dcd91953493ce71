"""Memory of a rollout GPU and the weights each update moves.

A rollout worker runs one engine over ``tensor_parallel_size`` (tp) GPUs and a
``WeightReceiver`` (``dapo.weights.receiver``) on the worker's first GPU. Weights travel
in the wire dtype (``dapo.weights.stream.wire_dtype``): ``rollout.dtype`` for vLLM, which
computes in it, ``model.dtype`` for the HF engine. A vLLM worker receives the whole model
into flat buffers (``dapo.weights.buckets.FlatBuffers``; vLLM's layer-wise reload takes
the whole list at once); an HF worker streams it through ``SYNC_DEPTH`` bucket buffers.
"""

from __future__ import annotations

from dapo.sizing.shapes import ModelShape

SYNC_BUCKET_BYTES = 64 << 20
"""Cap of one weight-sync bucket (the learner's ``sync_bucket_mb``, 64 MiB)."""
SYNC_DEPTH = 2
"""Buckets a streaming receiver holds (``WeightReceiver(depth=...)``); the sender holds
one more, the bucket being gathered and cast."""


def engine_weight_bytes(model: ModelShape, rollout_bytes: int, tp: int) -> float:
    """vLLM's weights on one GPU: tensor parallelism splits every layer and the vocabulary
    over the tp GPUs: P * b_r / tp."""
    return model.num_params() * rollout_bytes / tp


def kv_bytes_per_token(model: ModelShape, rollout_bytes: int, tp: int) -> float:
    """KV cache of one token on one GPU: a key and a value (kv = k * d wide each) per layer,
    the kv heads split over tp GPUs (replicated when tp exceeds them):
    2 L kv b_r / min(tp, k)."""
    split = min(tp, model.num_kv_heads)
    return 2 * model.num_layers * model.kv_dim * rollout_bytes / split


def concurrent_sequences(n: int, max_prompts: int, max_batch_rows: int) -> int:
    """Sequences one worker decodes at once: ``max_prompts`` prompt tasks of n samples each,
    capped by ``max_batch_rows`` (vLLM's max_num_seqs) when set."""
    rows = max_prompts * n
    return min(rows, max_batch_rows) if max_batch_rows else rows


def kv_cache_bytes(model: ModelShape, rollout_bytes: int, tp: int, seqs: int, tokens: int) -> float:
    """KV cache on one GPU for ``seqs`` sequences of ``tokens`` (prompt + response) tokens
    each, all at full length at once: what vLLM needs to generate them without preempting
    any (its paged cache holds fewer and recomputes the preempted)."""
    return seqs * tokens * kv_bytes_per_token(model, rollout_bytes, tp)


def receiver_buffer_bytes(model: ModelShape, wire_bytes: int, streaming: bool) -> float:
    """The receiver's buffers, on the worker's first GPU. Whole (vLLM): one full copy of the
    weights in the wire dtype, every bucket of the layout (padding under 8 KiB a bucket).
    Streaming (HF engine): ``SYNC_DEPTH`` buckets, or the model if it is smaller."""
    whole = float(model.num_params() * wire_bytes)
    return min(whole, SYNC_DEPTH * SYNC_BUCKET_BYTES) if streaming else whole


def sender_buffer_bytes(model: ModelShape, wire_bytes: int, in_place: bool) -> float:
    """The learner's weight-sync buffers on rank 0's GPU: ``SYNC_DEPTH`` buckets on the wire
    and one being filled (the model if it is smaller), without double buffering; none when
    the sender sends the parameters in place (``in_place``: one rank whose parameters are
    already in the wire dtype)."""
    if in_place:
        return 0.0
    return min(float(model.num_params() * wire_bytes), (SYNC_DEPTH + 1) * SYNC_BUCKET_BYTES)


def update_bytes(model: ModelShape, wire_bytes: int) -> float:
    """Bytes one weight update moves: every parameter once, P * b_r (a broadcast reaches
    every worker in one pass over the network, whatever their number)."""
    return float(model.num_params() * wire_bytes)


def update_seconds(nbytes: float, bandwidth_gb_s: float) -> float:
    """Time of one update at the stated bandwidth, nothing else counted (no latency, no
    packing): bytes / (GB/s * 1e9)."""
    return nbytes / (bandwidth_gb_s * 1e9)


GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of a GPU (``DAPO_VLLM_GPU_MEMORY_UTILIZATION`` 0 takes it, minus
the weight-sync buffers)."""


def sequences_that_fit(capacity: float, fixed: float, per_sequence: float) -> int:
    """Full-length sequences whose KV cache fits in vLLM's share of a GPU once the weights
    and the receiver's buffers are in: (0.9 capacity - fixed) / per sequence, floored."""
    free = GPU_MEMORY_UTILIZATION * capacity - fixed
    return max(int(free // per_sequence), 0) if per_sequence > 0 else 0
