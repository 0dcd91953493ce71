"""An in-flight weight update between real processes: the learner's ``WeightSender`` here,
a ``RolloutWorker`` over the real HF engine and a real ``WeightReceiver`` in a spawned
process, Redis from the ``redis_url`` fixture.

The worker generates long answers; each decode step is slowed to a large model's pace (a
tiny model decodes in a millisecond). The learner broadcasts version 1 while that
generation runs: the broadcast must finish long before the generation does (the learner
did not wait for it), and the samples of that very generation carry two segments, version
0 then 1, with log-probs from the weights of each. The update changes only ``lm_head``,
which leaves the kept KV cache as the new weights would have made it, so every log-prob
equals a teacher-forced recomputation by its version's model.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo.data.task.tokenizer import EOS_ID
from dapo.transport.redis_bus import connect
from dapo.weights.sender import WeightSender
from tests.e2e_helpers import make_model_dir

STEP_S = 0.04  # one decode step of a large model
MAX_NEW = 96
SIGNAL_AT = 8  # forward passes before the worker says it is generating
WORKER = "rollout-0"


def long_answer_model_dir(path: Path) -> Path:
    """The e2e tiny model with its rigged head moved off EOS onto "a": EOS is then no more
    likely than any byte, so answers run long."""
    make_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[ord("a")] = model.lm_head.weight[EOS_ID]
        model.lm_head.weight[EOS_ID] = 0.0
    model.save_pretrained(path)
    return path


def rollout_main(redis_url: str, run_id: str, model_dir: str) -> None:
    """The rollout worker: joins the weight sync, generates one slow group, reports it."""
    from dapo.engines.hf import HFEngine
    from dapo.runtime.runs import MemoryRunStore
    from dapo.runtime.service import ServiceContext
    from dapo.transport.memory_bus import MemoryBus
    from dapo.weights.receiver import WeightReceiver
    from proto.messages import SamplingParams
    from proto.runspec import RunSpec
    from services.rollout.service import RolloutWorker
    from tests.factories import prompt_task

    torch.set_num_threads(1)
    client = connect(redis_url)
    engine = HFEngine(model_dir, AutoTokenizer.from_pretrained(model_dir))
    receiver = WeightReceiver(
        client, run_id, WORKER, list(engine.named_parameters()), load_fn=engine.load_weights
    )
    receiver.join(wait_s=30)
    passes = 0

    def slow_step(module, args) -> None:
        nonlocal passes
        passes += 1
        if passes == SIGNAL_AT:
            client.rpush(f"test:{run_id}:generating", time.time())
        time.sleep(STEP_S)

    engine.model.register_forward_pre_hook(slow_step)
    spec = RunSpec.model_validate({"rollout": {"n": 4}})
    ctx = ServiceContext("rollout", run_id, spec, WORKER, MemoryBus(run_id), MemoryRunStore())
    worker = RolloutWorker(ctx, engine, receiver, "hf", version=0, max_prompts=1)
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=0)
    task = prompt_task(run_id, 0).model_copy(update={"sampling": sampling})
    ctx.bus.publish("prompts", task)
    client.rpush(f"test:{run_id}:joined", WORKER)
    worker.step()
    ended = time.time()
    (group,) = ctx.bus.read("rollouts")[1]
    result = {
        "ended": ended,
        "policy_version": group.policy_version,
        "prompt": task.prompt_ids.tolist(),
        "samples": [
            {
                "tokens": s.response_ids.tolist(),
                "logprobs": s.logprobs.tolist(),
                "versions": s.versions.tolist(),
                "starts": s.version_starts.tolist(),
            }
            for s in group.samples
        ],
    }
    client.rpush(f"test:{run_id}:result", json.dumps(result))
    receiver.close()


def pop(client, key: str, timeout: float) -> str:
    """Short BLPOPs up to the deadline (one long one would outlast the socket timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (item := client.blpop([key], timeout=1)) is not None:
            return item[1].decode()
    raise AssertionError(f"nothing on {key} within {timeout}s")


def teacher_forced(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """(L,) log-probs (temperature 1) of the response tokens from one uncached forward."""
    ids = torch.tensor([prompt + response])  # (1, P + L)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (L, V)
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0].numpy()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return long_answer_model_dir(tmp_path / "model")


def test_an_update_lands_inside_a_running_generation(redis_url, run_id, model_dir) -> None:
    torch.set_num_threads(1)
    client = connect(redis_url)
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    old = copy.deepcopy(learner)
    sender = WeightSender(
        client, run_id, list(learner.named_parameters()), timeout_s=20, join_timeout_s=10
    )
    proc = mp.get_context("spawn").Process(
        target=rollout_main, args=(redis_url, run_id, str(model_dir)), daemon=True
    )
    proc.start()
    try:
        pop(client, f"test:{run_id}:joined", timeout=90)
        pop(client, f"test:{run_id}:generating", timeout=30)
        with torch.no_grad():
            learner.lm_head.weight.mul_(2.0)  # the "optimizer step": the head only
        started = time.time()
        stats = sender.broadcast(1)
        done = time.time()
        result = json.loads(pop(client, f"test:{run_id}:result", timeout=60))
    finally:
        sender.close()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    broadcast_s, after_s = done - started, result["ended"] - done
    segments = [(s["versions"], s["starts"], len(s["tokens"])) for s in result["samples"]]
    print(f"broadcast {broadcast_s:.3f} s (acks + group {stats.rendezvous_s:.3f} s); the "
          f"generation went on {after_s:.3f} s; (versions, starts, length): {segments}")  # fmt: skip
    assert stats.members == (WORKER,)
    assert after_s > 1.0 and broadcast_s < after_s  # the learner did not wait for it
    assert result["policy_version"] == 0
    switches = {tuple(s["starts"]) for s in result["samples"] if len(s["versions"]) == 2}
    assert len(switches) == 1, result["samples"]  # every live row switched at the same token
    ((_, switch),) = switches
    gap = 0.0  # how far apart the two versions' log-probs are after the switch
    for s in result["samples"]:
        tokens = s["tokens"]
        split = len(tokens) > switch
        assert s["versions"] == ([0, 1] if split else [0])
        by_old = teacher_forced(old, result["prompt"], tokens)
        by_new = teacher_forced(learner, result["prompt"], tokens)
        expected = np.concatenate([by_old[:switch], by_new[switch:]])
        np.testing.assert_allclose(s["logprobs"], expected, atol=1e-4, rtol=0)
        gap = max(gap, float(np.abs(by_old[switch:] - by_new[switch:]).max(initial=0.0)))
    assert gap > 0.1  # the segments are told apart by their log-probs, not by chance
    assert max(len(s["tokens"]) for s in result["samples"]) > switch + 20
