"""How far ``dapo plan`` is from measured peaks, on CPU (signed, per cent of the measured).

- ``plan.redis.error_pct``: the plan's Redis data against the peak MEMORY USAGE of the
  run's four streams during a real ten-step run (the service processes on an embedded
  Redis; ``tests/dapo/sizing/redis_run.py``), the plan given the run's own mean prompt and
  response lengths and keep rate;
- ``plan.learner.error_pct``: the plan's learner-GPU total plus one rank's host share (a
  world of one: the CPU is both) against the resident-set peak above the bare process
  while one learner process builds a random Qwen2-shaped model (7.1M parameters, float32,
  untied head) and trains one batch of 2 groups x 4 samples of 64 + 448 tokens (micro-
  batches of 4, decoupled PPO: the proximal log-probs recomputed first);
  ``plan.learner_ckpt.error_pct`` the same with gradient checkpointing (``_predicted_mb``
  and ``_measured_mb`` beside them);
- ``plan.error_pct``: the largest of the three medians, in absolute value.

Each is the median of 3 repetitions (fresh processes), with ``_min`` and ``_max``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
PROMPT, RESPONSE, GROUPS, N = 64, 448, 2, 4


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def learner_spec(checkpointing: bool = False):
    from proto.runspec import RunSpec

    return RunSpec.model_validate(
        {
            "model": {"enable_gradient_checkpointing": checkpointing},
            "data": {
                "train_batch_size": GROUPS,
                "max_prompt_length": PROMPT,
                "max_response_length": RESPONSE,
            },
            "rollout": {"n": N},
            "actor": {"ppo_mini_batch_size": GROUPS, "ppo_micro_batch_size": 4},
            "reward": {"overlong_buffer": {"len": 16}},
        }
    )


def _batch():
    import numpy as np

    from proto.messages import ScoredGroup, ScoredSample, TrainingBatch

    rng = np.random.default_rng(0)

    def sample(i):
        ids = rng.integers(1, MODEL["vocab_size"], RESPONSE, dtype=np.int32)
        return ScoredSample(
            response_ids=ids,
            logprobs=np.full(RESPONSE, -1.0, np.float32),
            finish_reason="length",
            versions=[0],
            version_starts=[0],
            score=float(i % 2) * 2 - 1,
            acc=bool(i % 2),
            overlong_penalty=0.0,
            length=RESPONSE,
            truncated=True,
        )

    groups = [
        ScoredGroup(
            run_id="bench",
            group_id=f"g{g}",
            prompt_id=f"p{g}",
            prompt_ids=rng.integers(1, MODEL["vocab_size"], PROMPT, dtype=np.int32),
            ground_truth="1",
            n=N,
            policy_version=0,
            worker_id="w",
            engine="hf",
            gen_seconds=0.0,
            samples=[sample(i) for i in range(N)],
        )
        for g in range(GROUPS)
    ]
    return TrainingBatch(run_id="bench", batch_id=0, groups=groups)


def _learner_main(checkpointing: bool) -> None:
    """One learner process: model, batch and one training step; prints the peak bytes
    above the resident set before them."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from services.learner.model_init import checkpoint_layers
    from services.learner.trainer import Trainer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = learner_spec(checkpointing)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL, max_position_embeddings=1024))
    if checkpointing:  # as the learner's model_init does
        checkpoint_layers(model)
    trainer = Trainer(model, spec, "cpu", pad_id=0)
    trainer.train_batch(_batch())
    print(json.dumps({"peak": _status_mb("VmHWM") - before}))


def _learner_peak(checkpointing: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    cmd = [sys.executable, "-m", "bench.bench_plan", "learner", str(int(checkpointing))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def learner_predicted(checkpointing: bool) -> float:
    """The plan's bytes for the bench's learner (a world of one, no process overhead)."""
    from dapo.sizing import ClusterShape, make_plan, model_shape_from_config
    from dapo.sizing.shapes import GIB

    shape = model_shape_from_config({**MODEL, "model_type": "qwen2"})
    cluster = ClusterShape(learner_gpus=1, rollout_gpus=1, process_overhead_gib=0)
    plan = make_plan(learner_spec(checkpointing), shape, cluster)
    return (plan["learner_gpu"]["total"] + plan["learner_host"]["rank"]) * GIB


def redis_errors() -> list[float]:
    from dapo.sizing import ClusterShape, Workload, load_model_shape, make_plan
    from dapo.sizing.shapes import GIB
    from dapo.transport.redis_embed import EmbeddedRedis
    from tests.dapo.sizing.redis_run import measure_run

    errors = []
    with EmbeddedRedis() as server:
        for _ in range(REPEATS):
            with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
                run = measure_run(Path(tmp), server.url)
                plan = make_plan(
                    run.spec,
                    load_model_shape(run.model_dir),
                    ClusterShape(learner_gpus=1, rollout_gpus=1, reward_replicas=1),
                    Workload(
                        prompt_tokens=round(run.prompt_tokens),
                        response_tokens=max(round(run.response_tokens), 1),
                        keep_rate=min(max(run.keep_rate, 0.01), 1.0),
                    ),
                )
                measured = run.peaks["total"]
                errors.append(100 * (plan["redis"]["data"] * GIB - measured) / measured)
    return errors


def _summary(prefix: str, values: list[float]) -> dict[str, float]:
    return {
        prefix: statistics.median(values),
        f"{prefix}_min": min(values),
        f"{prefix}_max": max(values),
    }


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ckpt in (("learner", False), ("learner_ckpt", True)):
        predicted = learner_predicted(ckpt)
        peaks = [_learner_peak(ckpt) for _ in range(REPEATS)]
        out.update(_summary(f"plan.{name}.error_pct", [100 * (predicted - m) / m for m in peaks]))
        out[f"plan.{name}.predicted_mb"] = predicted / 2**20
        out[f"plan.{name}.measured_mb"] = statistics.median(peaks) / 2**20
    out.update(_summary("plan.redis.error_pct", redis_errors()))
    medians = ("plan.learner.error_pct", "plan.learner_ckpt.error_pct", "plan.redis.error_pct")
    out["plan.error_pct"] = max(abs(out[k]) for k in medians)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["learner"]:
        _learner_main(sys.argv[2] == "1")
    else:
        print(run())
