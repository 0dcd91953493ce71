"""The service stack on two GPUs: the learner on one (bf16 mixed precision), a rollout worker
with the HF engine on the other, and the weights between them over NCCL. Two processes
cannot share one GPU in an NCCL group, so this needs two GPUs and is skipped, saying so,
on one (``make gpu-check`` prints the same)."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec, wait_status

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="the NCCL weight broadcast needs two GPUs: two processes cannot share one GPU "
        "in an NCCL group",
    ),
]


def test_stack_on_two_gpus_trains_and_syncs_weights_over_nccl(tmp_path, redis_url):
    from dapo.cli.stack import Stack
    from dapo.runtime.runs import RunStore
    from dapo.weights.registry import WeightKeys, stale_or_mismatched_workers

    runs = tmp_path / "runs"
    bf16 = {"fsdp_config": {"mixed_precision": {"param_dtype": "bf16"}}}
    spec = small_spec(make_model_dir(tmp_path / "model"), make_dataset(tmp_path / "train.jsonl"),
                      runs, actor=bf16)  # fmt: skip
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    stack = Stack(redis_url, run_id, runs / run_id, threads=1)
    stack.start("sampler")
    stack.start("reward")
    stack.start("learner", extra_env={"DAPO_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0"})
    stack.start("rollout", extra_env={"DAPO_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "1"})
    try:
        stack.wait_ready(timeout_s=180)
        # the learner publishes its weight-sync rendezvous once its sender is up (and removes
        # it when it exits): read which backend it chose while the run goes on
        deadline = time.monotonic() + 180
        while (backend := store.client.hget(WeightKeys(run_id).rendezvous, "backend")) is None:
            assert time.monotonic() < deadline, "the learner never published its rendezvous"
            stack.check_alive()
            time.sleep(0.2)
        assert backend == b"nccl"  # the learner's weights are on its GPU
        store.set_status(run_id, "running")
        assert wait_status(store, stack, run_id, {"completed", "failed"}, 300) == "completed"
        state = store.state(run_id)
        assert state.step == 3 and state.policy_version == 3
        assert [r["batch_id"] for r in metrics_lines(stack.run_dir)] == [0, 1, 2]
        deadline = time.monotonic() + 60
        while (bad := stale_or_mismatched_workers(store.client, run_id, 3)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert bad == {}  # the worker holds the learner's final weights, bit for bit
    finally:
        stack.stop()
