"""Weight sync that streams, between real processes over gloo: bf16 on the wire from fp32
weights, a few staging buckets on both sides, a one-pass gathered source, and double
buffering (the learner changes its weights while the previous version is on the wire)."""

from __future__ import annotations

import torch

from dapo.weights.registry import stale_or_mismatched_workers
from dapo.weights.sender import WeightSender
from tests.dapo.weights.harness import DEEP_BUCKET_MB, assert_bit_equal, make_model, set_weights


def as_wire(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a worker holding fp32 parameters ends up with after a broadcast in `dtype`."""
    return {n: p.detach().to(dtype).to(p.dtype) for n, p in model.named_parameters()}


def gathered(model: torch.nn.Module, taken: list[str]):
    """A one-pass source that yields fresh copies, as a sharded learner's gathers do."""
    for name, param in model.named_parameters():
        taken.append(name)
        yield name, param.detach().clone()


def test_bf16_stream_holds_a_few_buckets_on_both_sides(cluster) -> None:
    model = make_model(deep=True)
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()),
        bucket_mb=DEEP_BUCKET_MB, timeout_s=20, wire_dtype=torch.bfloat16,
    )  # fmt: skip
    layout = sender.layout
    bucket_bytes = max(b.nbytes for b in layout.buckets)
    try:
        assert sender.buffers is None  # a cast: nothing adopted, the weights stay fp32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert {b.dtype for b in layout.buckets} == {torch.bfloat16} and len(layout.buckets) >= 8
        cluster.start("w-stream", deep=True, stream=True, verify=True)
        cluster.start("w-whole", deep=True, verify=True)
        for version in (1, 2):
            set_weights(model, version)
            taken: list[str] = []
            stats = sender.broadcast(version, gathered(model, taken))
            assert stats.members == ("w-stream", "w-whole")
            assert taken == [n for n, _ in model.named_parameters()]  # read once, in order
            # the learner held at most depth + 1 staging buckets, never the model
            assert 0 < stats.staging_bytes <= (sender.depth + 1) * bucket_bytes
            assert stats.staging_bytes < layout.total_bytes / 2
            cluster.wait_loaded(version, ["w-stream", "w-whole"])
            for worker in ("w-stream", "w-whole"):
                assert_bit_equal(cluster.received(worker, version), as_wire(model, torch.bfloat16))
            # both checksums (streamed and whole) prove the engines hold the bf16 weights
            assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}
        peak = int(cluster.client.get(f"test:{cluster.run_id}:peak:w-stream"))
        assert 1 <= peak <= 2  # the streaming receiver's staging buffers (depth 2)
    finally:
        sender.close()


def test_a_source_is_read_to_the_end_when_nobody_listens(redis_url, run_id) -> None:
    import redis

    model = make_model(deep=True)
    client = redis.Redis.from_url(redis_url)
    sender = WeightSender(
        client, run_id, list(model.named_parameters()), bucket_mb=DEEP_BUCKET_MB,
        timeout_s=5, wire_dtype=torch.bfloat16,
    )  # fmt: skip
    try:
        taken: list[str] = []
        stats = sender.broadcast(1, gathered(model, taken))
        assert stats.members == () and len(taken) == len(list(model.parameters()))
        assert client.hget(sender.keys.expected, "1").decode() == stats.checksum
    finally:
        sender.close()


def test_double_buffering_sends_the_snapshot_while_the_weights_move_on(cluster) -> None:
    model = make_model(deep=True)
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()),
        bucket_mb=DEEP_BUCKET_MB, timeout_s=20,
    )  # fmt: skip
    busy = f"test:{cluster.run_id}:busy:w-a"
    try:
        cluster.start("w-a", deep=True, stream=True, verify=True)
        set_weights(model, 1)
        want_1 = {n: p.detach().clone() for n, p in model.named_parameters()}
        cluster.client.set(busy, 1)  # holds version 1 in the ack wait, on the sender thread
        held_s = sender.start(1)
        assert held_s >= 0 and sender.in_flight.busy and sender.finished() == []
        set_weights(model, 2)  # "the next step" trains while version 1 waits for the wire
        assert cluster.client.hget(sender.keys.rendezvous, "version") is None  # not yet
        cluster.client.delete(busy)
        sender.start(2)  # waits for version 1 first: at most one version in flight
        [first] = sender.finished()
        assert first.version == 1 and first.members == ("w-a",)
        cluster.wait_loaded(1, ["w-a"])
        assert_bit_equal(cluster.received("w-a", 1), want_1)  # the snapshot, not the moved on
        sender.in_flight.wait()
        [second] = sender.finished()
        assert second.version == 2 and second.checksum != first.checksum
        cluster.wait_loaded(2, ["w-a"])
        assert_bit_equal(cluster.received("w-a", 2), {n: p for n, p in model.named_parameters()})
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}
    finally:
        sender.close()
