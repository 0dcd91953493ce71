"""A rollout worker whose vLLM engine dies: the death is reported, the worker exits
non-zero, and the prompts it had taken are reclaimed by another worker.

The worker is the real rollout service in its own process (``dapo.cli service rollout``),
with vLLM's engine core in a process of its own (``DAPO_VLLM_IN_PROCESS=0``), which the
test kills as the kernel's OOM killer would. The learner's side is a real
``WeightSender`` here (the worker waits for its rendezvous). The worker that reclaims is a
``RolloutWorker`` in the test process over the real Redis bus with a short
``BusSettings.claim_idle_ms`` (the service's own 30 s default would only make the test
wait) and the HF engine on the same model.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from dapo.cli.stack import Stack
from dapo.data.task.model import ModelShape, tiny_config
from dapo.data.task.tokenizer import save_byte_tokenizer
from dapo.engines.hf import HFEngine
from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.bus import BusSettings
from dapo.transport.redis_bus import RedisBus, connect
from dapo.weights.registry import live_workers
from dapo.weights.sender import WeightSender
from proto.keys import run_key
from proto.messages import PromptTask, SamplingParams
from services.rollout.service import RolloutWorker
from tests.e2e_helpers import make_dataset, small_spec

WORKER = "rollout-0"
TASKS = 3


def byte_model_dir(path: Path) -> Path:
    """A random Qwen2 for the byte tokenizer with heads of 32 dimensions (vLLM's CPU
    attention supports no smaller)."""
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=128, max_positions=128)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_config(shape)).save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def engine_core_of(pid: int, timeout_s: float = 120.0) -> psutil.Process:
    """The worker's vLLM engine core process, once it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no vLLM engine core under process {pid}")


class NoUpdates:
    def poll(self, timeout_s: float = 0.0) -> int | None:
        return None


def task(run_id: str, i: int) -> PromptTask:
    prompt = f"{i}+1=".encode()
    return PromptTask(
        run_id=run_id, group_id=f"{run_id}-{i}", prompt_id=f"p{i}", prompt_text=prompt.decode(),
        prompt_ids=np.frombuffer(prompt, dtype=np.uint8).astype(np.int32), ground_truth=str(i + 1),
        sampling=SamplingParams(n=4, max_new_tokens=8),
    )  # fmt: skip


def test_a_dead_engine_fails_its_worker_and_its_prompts_move_on(tmp_path, redis_url) -> None:
    model_dir = byte_model_dir(tmp_path / "model")
    spec = small_spec(
        model_dir, make_dataset(tmp_path / "train.jsonl"), tmp_path / "runs",
        rollout={"engine": "vllm", "n": 4, "dtype": "float32"},
    )  # fmt: skip
    client = connect(redis_url)
    store = RunStore(client)
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    learner = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sender = WeightSender(client, run_id, list(learner.named_parameters()), timeout_s=20)
    stack = Stack(redis_url, run_id, Path(spec.trainer.runs_dir) / run_id, threads=1)
    proc = stack.start("rollout", 0, extra_env={"DAPO_VLLM_IN_PROCESS": "0"})
    try:
        deadline = time.monotonic() + 180
        while WORKER not in live_workers(client, run_id):  # engine built, weight sync joined
            assert proc.popen.poll() is None, proc.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never joined"
            time.sleep(0.3)
        engine_core_of(proc.popen.pid).send_signal(signal.SIGKILL)
        bus = RedisBus(client, run_id, BusSettings(claim_idle_ms=300, claim_interval_s=0.1))
        bus.publish_many("prompts", [task(run_id, i) for i in range(TASKS)])  # one batch
        code = proc.popen.wait(timeout=120)
        log = proc.log_path.read_text()
        print(f"the worker exited with status {code}")
        assert code != 0 and "the vLLM engine died: EngineDeadError" in log, log[-3000:]
        prompts = run_key(run_id, "prompts")
        taken = client.xpending_range(prompts, "rollout", "-", "+", 10, consumername=WORKER)
        assert len(taken) == TASKS  # consumed, never acknowledged

        rt = ServiceContext("rollout", run_id, spec, "rollout-1", bus, store)
        engine = HFEngine(str(model_dir), AutoTokenizer.from_pretrained(model_dir))
        other = RolloutWorker(rt, engine, NoUpdates(), "hf")
        deadline, groups = time.monotonic() + 60, []
        while len(groups) < TASKS and time.monotonic() < deadline:
            other.step()
            groups = bus.read("rollouts")[1]
        assert sorted(g.group_id for g in groups) == sorted(f"{run_id}-{i}" for i in range(TASKS))
        assert {g.worker_id for g in groups} == {"rollout-1"}
        assert client.xpending(prompts, "rollout")["pending"] == 0
    finally:
        stack.stop(grace_s=10)
        sender.close()
        store.finish(run_id, "stopped")  # no active run left behind in the shared Redis
        if os.path.exists(proc.log_path):
            print(proc.log_path.read_text()[-2000:])
