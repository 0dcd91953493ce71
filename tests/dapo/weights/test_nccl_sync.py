"""NCCL failure semantics: a receiver killed mid-transfer makes the learner's broadcast
raise ``WeightSyncError`` (the communicator aborted, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``
while the weight-sync group is built) instead of torch's watchdog tearing the learner
down; the next update re-forms the group with the learner alive.

It needs two GPUs: the learner on cuda:0, the worker on cuda:1 (two processes cannot
share one GPU in an NCCL group). Run with ``pytest -m gpu tests/dapo/weights``; on a
machine with fewer GPUs it is skipped with that reason. The CPU test below checks that the
setting is scoped to the weight-sync group's construction."""

from __future__ import annotations

import os

import pytest
import torch

from dapo.weights.buckets import NCCL_CLEANUP_ONLY, NCCL_ERROR_HANDLING, _nccl_cleanup_only
from dapo.weights.registry import WeightSyncError
from dapo.weights.sender import WeightSender
from tests.dapo.weights.harness import (
    DEEP_BUCKET_MB,
    assert_bit_equal,
    make_model,
    set_weights,
    state_of,
)


def test_cleanup_only_error_handling_is_scoped_to_the_group_construction(monkeypatch) -> None:
    monkeypatch.setenv(NCCL_ERROR_HANDLING, "3")
    with _nccl_cleanup_only():
        assert os.environ[NCCL_ERROR_HANDLING] == NCCL_CLEANUP_ONLY
    assert os.environ[NCCL_ERROR_HANDLING] == "3"  # the learner's FSDP setting untouched
    monkeypatch.delenv(NCCL_ERROR_HANDLING)
    with _nccl_cleanup_only():
        assert os.environ[NCCL_ERROR_HANDLING] == NCCL_CLEANUP_ONLY
    assert NCCL_ERROR_HANDLING not in os.environ


@pytest.mark.gpu
def test_nccl_receiver_killed_mid_transfer_leaves_the_learner_alive(cluster) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("the NCCL broadcast needs two GPUs (learner and worker on separate ones)")
    model = make_model(deep=True).to("cuda:0")
    sender = WeightSender(
        cluster.client, cluster.run_id, list(model.named_parameters()), device="cuda:0",
        bucket_mb=DEEP_BUCKET_MB, timeout_s=20, join_timeout_s=10,
        wire_dtype=torch.bfloat16,
    )  # fmt: skip
    try:
        cluster.start("w-die", deep=True, stream=True, liveness_s=1.5, die_in_load=2,
                      device="cuda:1")  # fmt: skip
        set_weights(model, 1)
        assert sender.broadcast(1).members == ("w-die",)
        cluster.wait_loaded(1, ["w-die"])
        set_weights(model, 2)
        with pytest.raises(WeightSyncError, match="abandoned"):
            sender.broadcast(2)  # the worker died mid-transfer: raised, not torn down
        cluster.start("w-die", deep=True, stream=True, device="cuda:1")  # restarted
        set_weights(model, 3)
        stats = sender.broadcast(3)
        assert stats.members == ("w-die",) and stats.new_group
        cluster.wait_loaded(3, ["w-die"])
        want = {n: t.cpu().to(torch.bfloat16).float() for n, t in state_of(model).items()}
        assert_bit_equal(cluster.received("w-die", 3), want)
    finally:
        sender.close()
