"""Building blocks of the end-to-end tests: a tiny model + dataset on disk, and the
real service processes started by the launcher's ``Stack``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis
import torch
from transformers import Qwen2ForCausalLM

from dapo.cli.stack import Stack
from dapo.data.task.model import ModelShape, tiny_config
from dapo.data.task.tokenizer import EOS_ID, save_byte_tokenizer
from dapo.runtime.runs import RunStore
from proto.runspec import RunSpec


def make_model_dir(path: Path) -> Path:
    """A random tiny Qwen2 with the byte tokenizer, saved in Hugging Face format.

    Its output head is rigged so that EOS is likely at some positions and not at others
    (its logit follows one hidden unit, every other logit is 0): response lengths then vary
    within a group, the soft overlong penalty tells samples apart, and dynamic sampling on
    ``score`` keeps groups although a random model never answers correctly.
    """
    cfg = tiny_config(
        ModelShape(
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=64,
            max_positions=128,
        )
    )
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS_ID, 0] = 5.0
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def make_dataset(path: Path, n: int = 12, bad_row: int | None = None) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {
                "data_source": "arith",
                "prompt": [{"role": "user", "content": f"{i}+1="}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
                "extra_info": {"index": i},
            }
            if i == bad_row:
                del row["reward_model"]["ground_truth"]
            f.write(json.dumps(row) + "\n")
    return path


def small_spec(model_dir: Path, data: Path, runs_dir: Path, **sections) -> RunSpec:
    """A few-step run a random model can train on: groups vary by response length (the soft
    overlong penalty), so dynamic sampling on ``score`` keeps them."""
    tree = {
        "name": "e2e",
        "model": {"path": str(model_dir)},
        "data": {
            "train_files": [str(data)],
            "val_files": [str(data)],
            "train_batch_size": 2,
            "max_prompt_length": 32,
            "max_response_length": 8,
        },
        "rollout": {"n": 4},
        "actor": {
            "ppo_mini_batch_size": 2,
            "ppo_micro_batch_size": 8,
            "optim": {"lr": 1e-5, "lr_warmup_steps": 0},
        },
        "algorithm": {"filter_groups": {"metric": "score"}, "max_staleness": 1},
        "reward": {"overlong_buffer": {"len": 6, "penalty_factor": 1.0}},
        "trainer": {"total_training_steps": 3, "save_freq": 1, "runs_dir": str(runs_dir)},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RunSpec.model_validate(tree)


def start_run(
    redis_url: str, spec: RunSpec, rollout_workers: int = 2, env: dict | None = None
) -> tuple[RunStore, Stack]:
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    stack = Stack(redis_url, run_id, Path(spec.trainer.runs_dir) / run_id, threads=1)
    for kind in ("sampler", "reward", "learner"):
        stack.start(kind, extra_env=env)
    for i in range(rollout_workers):
        stack.start("rollout", i, extra_env=env)
    stack.wait_ready(timeout_s=120)
    store.set_status(run_id, "running")
    return store, stack


def wait_status(
    store: RunStore,
    stack: Stack,
    run_id: str,
    statuses: set[str],
    timeout_s: float = 180,
    supervise: bool = False,
) -> str:
    """Wait for one of ``statuses``; a dead service fails the wait, or with ``supervise`` is
    restarted as ``dapo up`` does (and counted in the run state)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if supervise:
            stack.supervise(lambda p: store.record_restart(run_id, p.worker_id))
        else:
            stack.check_alive()
        status = store.state(run_id).status
        if status in statuses:
            return status
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.worker_id}\n{p.log_path.read_text()[-3000:]}" for p in stack.procs)
    raise AssertionError(f"run never reached {statuses}\n{logs}")


def metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
