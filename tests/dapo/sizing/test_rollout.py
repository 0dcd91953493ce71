"""Rollout GPU and weight-sync formulas."""

from __future__ import annotations

import inspect
from pathlib import Path

from dapo.sizing import load_model_shape
from dapo.sizing import rollout as ro
from dapo.weights.receiver import WeightReceiver
from services.learner.main import LearnerSettings

QWEN_32B = load_model_shape(Path(__file__).resolve().parent / "qwen2.5-32b")


def test_kv_cache_of_a_token_is_a_key_and_a_value_per_layer():
    # 64 layers x 8 kv heads x 128 wide x (key + value) x 2 bytes: 256 KiB a token
    assert ro.kv_bytes_per_token(QWEN_32B, 2, 1) == 256 << 10
    assert ro.kv_bytes_per_token(QWEN_32B, 2, 4) == 64 << 10
    assert ro.kv_bytes_per_token(QWEN_32B, 2, 16) == 32 << 10  # 8 kv heads: replicated past 8


def test_concurrent_sequences_and_what_fits():
    assert ro.concurrent_sequences(16, 8, 0) == 128
    assert ro.concurrent_sequences(16, 8, 100) == 100
    assert ro.sequences_that_fit(100.0, 50.0, 10.0) == 4  # 0.9 * 100 - 50 = 40
    assert ro.sequences_that_fit(100.0, 95.0, 10.0) == 0


def test_vllm_receives_the_whole_model_hf_streams_buckets():
    whole = ro.receiver_buffer_bytes(QWEN_32B, 2, streaming=False)
    assert whole == 2 * QWEN_32B.num_params()
    assert ro.receiver_buffer_bytes(QWEN_32B, 2, streaming=True) == ro.SYNC_DEPTH * (64 << 20)
    assert ro.sender_buffer_bytes(QWEN_32B, 2, in_place=False) == (ro.SYNC_DEPTH + 1) * (64 << 20)
    assert ro.sender_buffer_bytes(QWEN_32B, 4, in_place=True) == 0


def test_update_time_is_bytes_over_bandwidth():
    nbytes = ro.update_bytes(QWEN_32B, 2)
    assert ro.update_seconds(nbytes, 50.0) == nbytes / 50e9


def test_weight_sync_constants_are_the_codes():
    fields = LearnerSettings.model_fields
    assert ro.SYNC_BUCKET_BYTES == int(fields["sync_bucket_mb"].default) << 20
    assert ro.SYNC_DEPTH == fields["sync_depth"].default
    assert ro.SYNC_DEPTH == inspect.signature(WeightReceiver).parameters["depth"].default
