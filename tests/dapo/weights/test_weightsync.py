"""Weight sync: bucket layout properties, and learner -> worker broadcasts between real
processes (the cluster of `tests.dapo.weights.harness`)."""

from __future__ import annotations

import json

import pytest
import redis
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dapo.weights.buckets import ALIGN_BYTES, ROW_BYTES, BucketLayout, FlatBuffers, buffer_checksum
from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import (
    CheckpointRef,
    LayoutMismatchError,
    WeightSyncError,
    needs_checkpoint,
    stale_or_mismatched_workers,
)
from dapo.weights.sender import WeightSender
from tests.dapo.weights.harness import (
    BUCKET_MB,
    assert_bit_equal,
    make_model,
    set_weights,
    state_of,
)

# ---------------------------------------------------------------- layout (in process)


def test_layout_is_deterministic_grouped_aligned_and_capped() -> None:
    named = list(make_model().named_parameters())
    layout = BucketLayout.from_named(named, BUCKET_MB)
    again = BucketLayout.from_named([(n, t.to("meta")) for n, t in named], BUCKET_MB)
    assert again == layout and again.fingerprint == layout.fingerprint
    assert len(layout.buckets) > 2
    cap = int(BUCKET_MB * (1 << 20))
    for bucket in layout.buckets:
        assert bucket.nbytes % ROW_BYTES == 0
        end = 0
        for slot in bucket.slots:
            assert slot.dtype == bucket.dtype
            assert (slot.offset * slot.dtype.itemsize) % ALIGN_BYTES == 0
            assert slot.offset >= end  # no overlap, list order kept
            end = slot.offset + slot.numel
        assert end * bucket.dtype.itemsize <= cap or len(bucket.slots) == 1
    # fp32 tensors first (first dtype seen), bf16 after, each group in model order
    dtypes = [b.dtype for b in layout.buckets]
    assert dtypes == sorted(dtypes, key=[torch.float32, torch.bfloat16].index)
    assert [s.name for s in layout.slots.values() if s.dtype == torch.bfloat16] == [
        "2.weight",
        "2.bias",
    ]
    assert BucketLayout.from_json(layout.to_json()).fingerprint == layout.fingerprint


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 40), min_size=0, max_size=3),
            st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.floats(0.001, 0.05),
)
def test_layout_places_every_tensor_once_without_overlap(specs, bucket_mb) -> None:
    named = [(f"p{i}", torch.empty(shape, dtype=d)) for i, (shape, d) in enumerate(specs)]
    layout = BucketLayout.from_named(named, bucket_mb)
    assert sorted(layout.slots) == sorted(n for n, _ in named)
    for bucket in layout.buckets:
        spans = sorted((s.offset, s.offset + s.numel) for s in bucket.slots)
        assert all(
            a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)
        )
        assert all(end <= bucket.numel for _, end in spans)
    buffers = FlatBuffers(layout)
    for _, tensor in named:
        tensor.copy_(torch.randint(-100, 100, tensor.shape))
    buffers.pack(named)
    assert_bit_equal(dict(buffers.views()), dict(named))


def test_fingerprint_changes_with_name_shape_or_dtype() -> None:
    base = [("a", torch.empty(4, 3)), ("b", torch.empty(5))]
    fingerprint = BucketLayout.from_named(base).fingerprint
    variants = [
        [("a", torch.empty(4, 3)), ("c", torch.empty(5))],
        [("a", torch.empty(3, 4)), ("b", torch.empty(5))],
        [("a", torch.empty(4, 3, dtype=torch.float16)), ("b", torch.empty(5))],
    ]
    for variant in variants:
        assert BucketLayout.from_named(variant).fingerprint != fingerprint
    with pytest.raises(ValueError, match="duplicate parameter name 'a'"):
        BucketLayout.from_named([("a", torch.empty(1)), ("a", torch.empty(2))])
    layout = BucketLayout.from_named(base)
    assert layout.mismatches([("a", torch.empty(4, 2)), ("z", torch.empty(1))]) == [
        "missing 'b'",
        "unexpected 'z'",
        "'a' has shape (4, 2), expected (4, 3)",
    ]


def test_pack_checks_shapes_and_adopt_shares_storage() -> None:
    model = make_model()
    named = list(model.named_parameters())
    buffers = FlatBuffers(BucketLayout.from_named(named, BUCKET_MB))
    with pytest.raises(ValueError, match="'0.weight' is \\(3,\\)"):
        buffers.pack({**dict(named), "0.weight": torch.zeros(3)})
    buffers.adopt(named)
    views = dict(buffers.views())
    with torch.no_grad():
        model[0].weight.add_(1.0)  # an in-place optimizer step lands in the buffer
    assert model[0].weight.data_ptr() == views["0.weight"].data_ptr()
    assert torch.equal(views["0.weight"], model[0].weight)


def test_checksum_is_exact_and_sensitive() -> None:
    named = list(make_model().named_parameters())
    layout = BucketLayout.from_named(named, BUCKET_MB)
    first, second = FlatBuffers(layout), FlatBuffers(layout)
    first.pack(named)
    second.pack({n: t.clone() for n, t in named})
    assert first.checksum() == second.checksum()
    flat = second.tensors[0]
    flat[5] = torch.nextafter(flat[5], torch.tensor(float("inf")))  # one ulp
    assert first.checksum() != second.checksum()
    # rows swapped: each row sum is unchanged, their order is not
    words = torch.arange(2 * ROW_BYTES // 4, dtype=torch.int32)
    swapped = torch.cat([words[ROW_BYTES // 4 :], words[: ROW_BYTES // 4]])
    assert buffer_checksum([words]) != buffer_checksum([swapped])
    assert buffer_checksum([words]) == buffer_checksum([words.clone()])


# ---------------------------------------------------------------- rendezvous (in process)


def test_receiver_with_another_model_is_refused(redis_url, run_id) -> None:
    client = redis.Redis.from_url(redis_url)
    sender = WeightSender(client, run_id, list(make_model().named_parameters()), timeout_s=5)
    try:
        other = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 40))
        receiver = WeightReceiver(client, run_id, "w-bad", list(other.named_parameters()), print)
        with pytest.raises(LayoutMismatchError, match="'2.weight' has shape \\(40, 48\\)"):
            receiver.join(wait_s=2)
        own = BucketLayout.from_named(list(make_model().named_parameters()), bucket_mb=1e-3)
        receiver = WeightReceiver(client, run_id, "w-cap", own, print)
        with pytest.raises(LayoutMismatchError, match="layout fingerprint"):
            receiver.join(wait_s=2)
        # no worker live: the update is a no-op on the wire but still publishes its checksum
        stats = sender.broadcast(0)
        assert stats.members == () and stats.checksum == sender.buffers.checksum()
        assert client.hget(sender.keys.expected, "0").decode() == stats.checksum
        assert sender.broadcast(0).members == ()  # the same version again: a resend
        sender.broadcast(1)
        with pytest.raises(ValueError, match="version 0 is below the last one, 1"):
            sender.broadcast(0)
    finally:
        sender.close()


# ---------------------------------------------------------------- real processes


def test_workers_hold_the_learners_weights_bit_for_bit(cluster) -> None:
    model = make_model()
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()), bucket_mb=BUCKET_MB,
        timeout_s=20,
    )  # fmt: skip
    try:
        cluster.start("w-a", verify=True)
        cluster.start("w-b")
        cluster.start("w-bad", verify=True, corrupt=True)
        for version in (1, 2, 3):
            set_weights(model, version)
            stats = sender.broadcast(version)
            assert stats.members == ("w-a", "w-b", "w-bad")
            assert stats.new_group == (version == 1) and stats.generation == 1
            assert stats.bytes == sender.layout.total_bytes
            cluster.wait_loaded(version, ["w-a", "w-b", "w-bad"])
            for worker in ("w-a", "w-b"):
                assert_bit_equal(cluster.received(worker, version), state_of(model))
            assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {
                "w-bad": f"checksum mismatch at version {version}"
            }
        verdicts = stale_or_mismatched_workers(cluster.client, cluster.run_id, version=4)
        assert verdicts["w-a"] == "stale: holds version 3, expected 4"
    finally:
        sender.close()


def test_late_joiner_loads_the_checkpoint_then_joins_the_next_update(cluster, tmp_path) -> None:
    model = make_model()
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()), bucket_mb=BUCKET_MB,
        timeout_s=20, share_storage=False,
    )  # fmt: skip
    try:
        cluster.start("w-early")
        for version in (1, 2):
            set_weights(model, version)
            sender.broadcast(version)
            cluster.wait_loaded(version, ["w-early"])
        ckpt = tmp_path / "ckpt-2"
        ckpt.mkdir()
        torch.save(model.state_dict(), ckpt / "model.pt")
        sender.publish_checkpoint(2, str(ckpt))
        assert needs_checkpoint(cluster.client, cluster.run_id, 2) is None

        cluster.start("w-late", verify=True)
        assert CheckpointRef(*json.loads(cluster.pop("ckpt:w-late"))) == (2, str(ckpt))
        # its checkpoint-loaded weights already verify against version 2
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}

        set_weights(model, 3)
        stats = sender.broadcast(3)
        assert stats.members == ("w-early", "w-late") and stats.new_group
        cluster.wait_loaded(3, ["w-early", "w-late"])
        for worker in ("w-early", "w-late"):
            assert_bit_equal(cluster.received(worker, 3), state_of(model))
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}
    finally:
        sender.close()


def test_hung_worker_fails_one_update_and_is_left_out_of_the_next(cluster) -> None:
    model = make_model()
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()), bucket_mb=BUCKET_MB,
        timeout_s=3, join_timeout_s=6,
    )  # fmt: skip
    try:
        cluster.start("w-ok", liveness_s=1.5)
        cluster.start("w-hang", liveness_s=1.5, freeze_at=2)
        set_weights(model, 1)
        assert sender.broadcast(1).members == ("w-hang", "w-ok")
        cluster.wait_loaded(1, ["w-hang", "w-ok"])

        set_weights(model, 2)
        with pytest.raises(WeightSyncError, match="generation 1 .* abandoned"):
            sender.broadcast(2)  # bounded by timeout_s, not forever

        set_weights(model, 3)
        stats = sender.broadcast(3)
        assert stats.members == ("w-ok",) and stats.new_group and stats.generation == 2
        got = cluster.pop("got")
        if got == "w-ok:2":  # the survivor may have completed version 2 before the failure
            got = cluster.pop("got")
        assert got == "w-ok:3"
        assert_bit_equal(cluster.received("w-ok", 3), state_of(model))
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}
    finally:
        sender.close()
        cluster.procs["w-hang"].kill()
