"""A short real run whose streams' memory is watched: the service processes on a private
Redis, MEMORY USAGE of each stream sampled while it trains. Used by the sizing test and by
``bench/bench_plan.py``."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from proto.codec import decode
from proto.keys import run_key
from proto.messages import ScoredGroup, TrainingBatchRef
from proto.runspec import RunSpec
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec, start_run, wait_status

STREAMS = ("prompts", "rollouts", "scored", "batches")


@dataclass
class MeasuredRun:
    spec: RunSpec
    model_dir: Path
    peaks: dict[str, int]
    """Peak bytes of each stream and of their sum (``total``)."""
    prompt_tokens: float
    """Mean prompt tokens of the trained samples."""
    response_tokens: float
    """Mean response tokens of the trained samples."""
    keep_rate: float
    """Groups trained / groups trained or filtered."""
    batches_left: int
    """Entries of the batches stream at the end."""


def run_spec(folder: Path) -> RunSpec:
    """Ten steps of four groups of eight samples, a checkpoint every five."""
    tree = small_spec(
        make_model_dir(folder / "model"), make_dataset(folder / "train.jsonl"), folder / "runs"
    ).model_dump()
    tree["data"] |= {"train_batch_size": 4, "max_response_length": 12}
    tree["rollout"]["n"] = 8
    tree["actor"] |= {"ppo_mini_batch_size": 4, "ppo_micro_batch_size": 32}
    tree["reward"]["overlong_buffer"] |= {"len": 8}
    tree["trainer"] |= {"total_training_steps": 10, "save_freq": 5}
    return RunSpec.model_validate(tree)


def stream_bytes(client: redis.Redis, run_id: str) -> dict[str, int]:
    """MEMORY USAGE of each stream of the run, every node counted (SAMPLES 0)."""
    return {
        name: int(client.memory_usage(run_key(run_id, name), samples=0) or 0) for name in STREAMS
    }


def _read_scored(client, run_id, seen: dict[str, tuple[int, list[int]]], after: str) -> str:
    """Groups written on ``scored`` after entry ``after``: (prompt tokens, response tokens)
    by entry id. A kept group stays on the stream at least until the checkpoint after its
    batch, so a reader that keeps up sees every one a batch refers to."""
    for entry_id, fields in client.xrange(run_key(run_id, "scored"), min=f"({after}"):
        after = entry_id.decode()
        group = decode(fields, ScoredGroup)
        seen[after] = (group.prompt_ids.size, [s.response_ids.size for s in group.samples])
    return after


def _watch(client, run_id, peaks: dict[str, int], groups: dict, stop: threading.Event) -> None:
    after = "0-0"
    while not stop.wait(0.05):
        now = stream_bytes(client, run_id)
        peaks["total"] = max(peaks.get("total", 0), sum(now.values()))
        for name, used in now.items():
            peaks[name] = max(peaks.get(name, 0), used)
        after = _read_scored(client, run_id, groups, after)


def _lengths(client, run_id, groups: dict) -> tuple[float, float, int]:
    """Mean prompt and response tokens of the trained samples: the groups the batch
    references name."""
    prompts, responses = [], []
    entries = client.xrange(run_key(run_id, "batches"))
    for _, fields in entries:
        for entry_id in decode(fields, TrainingBatchRef).entry_ids:
            prompt, lengths = groups[entry_id]
            prompts += [prompt] * len(lengths)
            responses += lengths
    return float(np.mean(prompts)), float(np.mean(responses)), len(entries)


def measure_run(folder: Path, redis_url: str) -> MeasuredRun:
    """Run ``run_spec`` to completion, watching the streams; what it produced."""
    spec = run_spec(folder)
    client = redis.Redis.from_url(redis_url)
    store, stack = start_run(redis_url, spec, rollout_workers=1)
    peaks: dict[str, int] = {}
    groups: dict[str, tuple[int, list[int]]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(client, stack.run_id, peaks, groups, stop))
    watcher.start()
    try:
        assert wait_status(store, stack, stack.run_id, {"completed"}, timeout_s=240) == "completed"
    finally:
        stop.set()
        watcher.join()
        stack.stop()
    prompt, response, left = _lengths(client, stack.run_id, groups)
    acc = store.account(stack.run_id)
    filtered = acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    keep = acc["trained"] / max(acc["trained"] + filtered, 1)
    return MeasuredRun(spec, folder / "model", peaks, prompt, response, keep, left)
