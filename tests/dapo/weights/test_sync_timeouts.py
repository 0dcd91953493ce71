"""How long the learner waits: the sender's timeouts come from the learner's settings and
grow with the bytes, and a worker too busy to ack an update is left out of it after the
ack wait and catches up at the next (every broadcast carries the full weights)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from dapo.transport.redis_bus import connect
from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import stale_or_mismatched_workers
from dapo.weights.sender import WeightSender, collective_timeout_s
from tests.dapo.weights.harness import (
    BUCKET_MB,
    assert_bit_equal,
    make_model,
    set_weights,
    state_of,
)


def test_timeouts_come_from_the_learner_settings_and_grow_with_the_bytes(
    redis_url, run_id, monkeypatch
) -> None:
    from services.learner.main import LearnerSettings, open_sender

    for name, value in [("JOIN_TIMEOUT_S", "4"), ("TIMEOUT_S", "7"), ("MIN_BANDWIDTH_MB_S", "0.5"),
                        ("BUCKET_TIMEOUT_S", "3"), ("BUCKET_MB", "0.004"), ("DEPTH", "3")]:  # fmt: skip
        monkeypatch.setenv(f"DAPO_SYNC_{name}", value)
    settings = LearnerSettings.from_env()
    model = make_model()
    ranks = SimpleNamespace(world=1, device=torch.device("cpu"))
    policy = SimpleNamespace(trainer=SimpleNamespace(model=model), ranks=ranks)
    client = connect(redis_url)
    spec = SimpleNamespace(rollout=SimpleNamespace(engine="vllm", dtype="bfloat16"))
    sender = open_sender(SimpleNamespace(client=client, ctx=SimpleNamespace(run_id=run_id, spec=spec)),
                         policy, settings)  # fmt: skip
    receiver = WeightReceiver(client, run_id, "w-0", list(model.named_parameters()), print)
    try:
        nbytes = sender.layout.total_bytes  # ~20 KB: 0.04 s at 0.5 MiB/s
        expected = 7 + nbytes / (0.5 * (1 << 20))
        assert collective_timeout_s(7, nbytes, 0.5) == pytest.approx(expected)
        assert sender.collective_timeout.total_seconds() == pytest.approx(expected)
        assert sender.join_timeout_s == 4 and sender.timeout.total_seconds() == 7
        # vLLM computes in rollout.dtype: the fp32 weights travel in bf16, streamed
        assert {b.dtype for b in sender.layout.buckets} == {torch.bfloat16}
        assert sender.buffers is None and sender.depth == 3 and sender.layout.bucket_mb == 0.004
        assert sender.bucket_timeout_s == 3 and len(sender.layout.buckets) > 1
        assert collective_timeout_s(7, 64 << 30, 100) == pytest.approx(7 + 655.36)  # 64 GiB
        receiver.join(wait_s=2)  # workers wait as long as the learner, read from the rendezvous
        assert receiver._collective_timeout() == sender.collective_timeout
        assert float(receiver._rendezvous["join_timeout_s"]) == 4
    finally:
        receiver.close()
        sender.close()
    with pytest.raises(ValueError, match="min_bandwidth_mb_s"):
        WeightSender(client, run_id, list(model.named_parameters()), min_bandwidth_mb_s=0)


def test_a_worker_busy_through_an_update_is_left_out_and_catches_up_at_the_next(
    cluster,
) -> None:
    model = make_model()
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()), bucket_mb=BUCKET_MB,
        timeout_s=20, join_timeout_s=1.5,
    )  # fmt: skip
    busy = f"test:{cluster.run_id}:busy:w-busy"
    try:
        cluster.client.set(busy, 1)  # before it joins: it never polls while busy
        cluster.start("w-free", "w-busy")
        set_weights(model, 1)
        started = time.monotonic()
        stats = sender.broadcast(1)  # waits join_timeout_s for w-busy's ack, no longer
        assert stats.members == ("w-free",) and time.monotonic() - started < 1.5 + 5
        cluster.wait_loaded(1, ["w-free"])
        verdicts = stale_or_mismatched_workers(cluster.client, cluster.run_id, version=1)
        assert verdicts["w-busy"] == "no report"
        cluster.client.delete(busy)

        stats = sender.broadcast(1)  # a resend of the same version reaches the one who missed it
        assert stats.members == ("w-busy", "w-free") and stats.new_group
        cluster.wait_loaded(1, ["w-busy", "w-free"])
        assert_bit_equal(cluster.received("w-busy", 1), state_of(model))
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id, version=1) == {}

        set_weights(model, 2)
        stats = sender.broadcast(2)
        assert stats.members == ("w-busy", "w-free") and not stats.new_group  # same members
        cluster.wait_loaded(2, ["w-busy", "w-free"])
        for worker in ("w-busy", "w-free"):  # every broadcast carries the full weights
            assert_bit_equal(cluster.received(worker, 2), state_of(model))
    finally:
        sender.close()
