"""Streaming buckets in process: staging from a mapping or a one-pass stream, casting to
the wire dtype, the bucket-by-bucket checksum, and per-bucket timeouts scaled to bytes."""

from __future__ import annotations

import pytest
import torch

from dapo.weights.buckets import BucketLayout, FlatBuffers, RowDigest, buffer_checksum
from dapo.weights.stream import StagingPool, bucket_timeout_s, stage_buckets, wire_layout
from tests.dapo.weights.harness import BUCKET_MB, assert_bit_equal, make_model


def _named() -> list[tuple[str, torch.Tensor]]:
    named = [(n, p.detach()) for n, p in make_model().named_parameters()]
    return named + [("steps", torch.arange(7, dtype=torch.int64))]  # not floating: not cast


def test_wire_layout_casts_floating_parameters_only() -> None:
    layout = wire_layout(_named(), BUCKET_MB, torch.bfloat16)
    dtypes = {s.name: s.dtype for s in layout.slots.values()}
    assert dtypes["0.weight"] == dtypes["2.weight"] == torch.bfloat16
    assert dtypes["steps"] == torch.int64
    assert [s.name for s in layout.slots.values()][:6] == [n for n, _ in _named()][:6]
    assert wire_layout(_named(), BUCKET_MB, None) == BucketLayout.from_named(_named(), BUCKET_MB)


@pytest.mark.parametrize("as_stream", [False, True])
def test_staged_buckets_equal_the_whole_model_cast_to_the_wire_dtype(as_stream) -> None:
    named = _named()
    layout = wire_layout(named, BUCKET_MB, torch.bfloat16)
    whole = FlatBuffers(layout)
    whole.pack(dict(named), cast=True)
    # a stream in another order than the layout's: bf16 parameters came first in the model
    source = iter(named[::-1]) if as_stream else dict(named)
    pool, digest, got = StagingPool(layout, torch.device("cpu")), RowDigest(), {}
    for bucket, flat in stage_buckets(layout, source, pool):
        assert flat.dtype == bucket.dtype and flat.numel() == bucket.numel
        assert torch.equal(flat.view(torch.uint8), whole.tensors[bucket.index].view(torch.uint8))
        digest.update(flat)
        got.update({s.name: flat[s.offset : s.offset + s.numel].clone() for s in bucket.slots})
        pool.release(flat)
    assert digest.hexdigest() == buffer_checksum(whole.tensors) == whole.checksum()
    want = {n: v.reshape(-1) for n, v in whole.views()}
    assert_bit_equal(got, want)
    if as_stream:  # a reversed stream fills buckets from the last: all open until the first
        assert pool.peak <= len(layout.buckets)
    else:  # in order, a released buffer is reused for the next bucket
        assert pool.peak == 1 and pool.nbytes() == max(b.nbytes for b in layout.buckets)


def test_an_in_order_stream_holds_one_bucket_at_a_time() -> None:
    named = [(n, t) for n, t in _named() if t.dtype.is_floating_point]
    layout = wire_layout(named, BUCKET_MB, torch.bfloat16)  # one dtype: model order
    assert len(layout.buckets) > 2
    pool = StagingPool(layout, torch.device("cpu"))
    held = []
    for _, flat in stage_buckets(layout, iter(named), pool):
        held.append(pool.held)
        pool.release(flat)
    assert max(held) == 1 and pool.peak == 1


def test_a_source_missing_or_adding_a_parameter_is_named() -> None:
    named = _named()
    layout = wire_layout(named, BUCKET_MB, None)
    pool = StagingPool(layout, torch.device("cpu"))
    with pytest.raises(KeyError, match="'2.bias'"):
        list(stage_buckets(layout, iter([p for p in named if p[0] != "2.bias"]), pool))
    with pytest.raises(KeyError, match="'2.bias' of the layout was not given"):
        list(stage_buckets(layout, {n: t for n, t in named if n != "2.bias"}, pool))
    with pytest.raises(KeyError, match="'extra' is not in the layout"):
        list(stage_buckets(layout, iter([*named, ("extra", torch.zeros(1))]), pool))
    with pytest.raises(ValueError, match="'0.bias' has shape \\(3,\\)"):
        list(stage_buckets(layout, {**dict(named), "0.bias": torch.zeros(3)}, pool))


def test_bucket_timeouts_grow_with_the_bytes() -> None:
    assert bucket_timeout_s(5.0, 0, 100.0) == 5.0
    assert bucket_timeout_s(5.0, 64 << 20, 100.0) == pytest.approx(5.64)
    assert bucket_timeout_s(5.0, 64 << 20, 1.0) == pytest.approx(69.0)


def test_the_wire_dtype_follows_the_rollout_engine() -> None:
    from dapo.weights.stream import wire_dtype

    assert wire_dtype("auto", "vllm", "bfloat16") == torch.bfloat16
    assert wire_dtype("auto", "hf", "bfloat16") is None  # HF computes in what it loaded
    assert wire_dtype("float32", "vllm", "bfloat16") == torch.float32
    assert wire_dtype("float16", "hf", "bfloat16") == torch.float16
