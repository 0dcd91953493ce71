"""Failures during a streamed broadcast, on gloo between real processes: a receiver killed
mid-transfer, a receiver hung mid-transfer (the bucket's own timeout ends the wait), a
killed receiver restarted under the same worker id, during the ack wait too. Each time the
learner raises ``WeightSyncError``, stays alive and forms the next generation."""

from __future__ import annotations

import re
import threading
import time

import pytest

from dapo.weights.registry import WeightSyncError, stale_or_mismatched_workers
from dapo.weights.sender import WeightSender
from tests.dapo.weights.harness import (
    DEEP_BUCKET_MB,
    assert_bit_equal,
    make_model,
    set_weights,
    state_of,
)


def _sender(cluster, model, **kwargs) -> WeightSender:
    return WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()),
        bucket_mb=DEEP_BUCKET_MB, **kwargs,
    )  # fmt: skip


def test_a_receiver_killed_mid_transfer_fails_one_update_and_rejoins(cluster) -> None:
    model = make_model(deep=True)
    sender = _sender(cluster, model, timeout_s=20, join_timeout_s=10, share_storage=False)
    try:
        cluster.start("w-ok", deep=True, stream=True, liveness_s=1.5)
        cluster.start("w-die", deep=True, stream=True, liveness_s=1.5, die_in_load=2)
        set_weights(model, 1)
        assert sender.broadcast(1).members == ("w-die", "w-ok")
        cluster.wait_loaded(1, ["w-die", "w-ok"])

        set_weights(model, 2)  # w-die is SIGKILLed after its first tensor of version 2
        with pytest.raises(WeightSyncError, match="generation 1 .* abandoned"):
            sender.broadcast(2)
        cluster.procs["w-die"].join(timeout=30)
        assert cluster.procs["w-die"].exitcode == -9

        set_weights(model, 3)  # the learner lives on: a new generation of the survivor
        stats = sender.broadcast(3)
        assert stats.members == ("w-ok",) and stats.new_group and stats.generation == 2
        _skip_partial(cluster, "w-ok", 2)
        assert_bit_equal(cluster.received("w-ok", 3), state_of(model))

        cluster.start("w-die", deep=True, stream=True, liveness_s=1.5)  # restarted, same id
        set_weights(model, 4)
        stats = sender.broadcast(4)
        assert stats.members == ("w-die", "w-ok") and stats.new_group and stats.generation == 3
        cluster.wait_loaded(4, ["w-die", "w-ok"])
        for worker in ("w-die", "w-ok"):
            assert_bit_equal(cluster.received(worker, 4), state_of(model))
    finally:
        sender.close()


def _skip_partial(cluster, worker: str, failed: int) -> None:
    """The survivor may or may not have completed the failed version before the failure."""
    got = cluster.pop("got")
    if got == f"{worker}:{failed}":
        got = cluster.pop("got")
    assert got == f"{worker}:{failed + 1}"


def test_a_receiver_hung_mid_transfer_times_out_on_its_bucket(cluster) -> None:
    model = make_model(deep=True)
    # the whole model may take 300 s; one bucket (8 KiB) only its 2 s allowance
    sender = _sender(
        cluster, model, timeout_s=300, bucket_timeout_s=2, join_timeout_s=10,
        share_storage=False,
    )  # fmt: skip
    try:
        cluster.start("w-ok", deep=True, stream=True, liveness_s=1.5)
        cluster.start("w-hang", deep=True, stream=True, liveness_s=1.5, freeze_in_load=2)
        set_weights(model, 1)
        sender.broadcast(1)
        cluster.wait_loaded(1, ["w-hang", "w-ok"])

        set_weights(model, 2)  # w-hang SIGSTOPs itself inside version 2
        with pytest.raises(WeightSyncError) as failure:
            sender.broadcast(2)
        # ended by a bucket's timeout (2 s + 8 KiB at 100 MiB/s), not the model's (300 s)
        waited = re.search(r"bytes\) not sent within ([\d.]+) s", str(failure.value))
        assert waited and 2.0 <= float(waited.group(1)) <= 2.01, str(failure.value)

        set_weights(model, 3)
        stats = sender.broadcast(3)  # w-hang's heartbeat stopped: left out once expired
        assert stats.members == ("w-ok",) and stats.new_group
        _skip_partial(cluster, "w-ok", 2)
        assert_bit_equal(cluster.received("w-ok", 3), state_of(model))
        assert stale_or_mismatched_workers(cluster.client, cluster.run_id) == {}
    finally:
        sender.close()
        cluster.procs["w-hang"].kill()


def test_a_worker_restarted_under_its_id_during_the_ack_wait_acks_the_update(cluster) -> None:
    """A restarted worker must take part in the update pending when it joins: were it to
    mark that update seen, the learner would wait for its ack until the join timeout and
    leave it out (members empty)."""
    model = make_model(deep=True)
    sender = _sender(cluster, model, timeout_s=20, join_timeout_s=120)
    try:
        cluster.start("w-r", deep=True)  # liveness 15 s: its key outlives the kill below
        set_weights(model, 1)
        sender.broadcast(1)
        cluster.wait_loaded(1, ["w-r"])
        cluster.procs["w-r"].kill()
        cluster.procs["w-r"].join()

        set_weights(model, 2)
        result: dict = {}
        learner = threading.Thread(target=lambda: result.update(stats=sender.broadcast(2)))
        learner.start()  # waits for w-r's ack: its alive key has not expired
        while cluster.client.hget(sender.keys.rendezvous, "pending_version") != b"2":
            time.sleep(0.05)
        cluster.start("w-r", deep=True)  # the restart, under the same id, mid-update
        learner.join()
        assert result["stats"].members == ("w-r",)
        cluster.wait_loaded(2, ["w-r"])
        assert_bit_equal(cluster.received("w-r", 2), state_of(model))
    finally:
        sender.close()
