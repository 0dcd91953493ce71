"""The whole pipeline on the default task: throughput, time to 80% held-out accuracy, and
asynchronous versus on-policy scheduling.

- ``e2e.samples_per_s``: samples trained per second of training wall time (G x groups per
  batch x steps / time from run start to the last step), with the default asynchrony
  (``algorithm.max_staleness`` 1);
- ``e2e.seconds_to_80pct``: training seconds until the held-out accuracy (256 problems x 2
  samples at temperature 1, top_p 1) of a saved checkpoint first reaches 80%; checkpoints
  are evaluated after the run, so evaluation does not slow training. -1 when the step
  budget ends first;
- ``sync.ratio_async_vs_onpolicy``: samples/s of the default run over that of the same run
  with ``max_staleness`` 0 (strictly on-policy, synchronous behaviour).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dapo.cli.evaluate import EvalSpec, evaluate_model_dir
from dapo.cli.local import LocalRun
from dapo.data.dataset import load_default_or_files
from dapo.runtime.config import load_run_spec
from proto.messages import SamplingParams

STEPS_TO_80 = int(os.environ.get("DAPO_BENCH_E2E_STEPS", "700"))
STEPS_RATIO = int(os.environ.get("DAPO_BENCH_RATIO_STEPS", "80"))


def train(steps: int, runs_dir: Path, save_freq: int, staleness: int) -> tuple[Path, dict]:
    spec = load_run_spec(
        "cpu-small",
        [
            f"trainer.total_training_steps={steps}",
            f"trainer.save_freq={save_freq}",
            f"trainer.runs_dir={runs_dir}",
            f"algorithm.max_staleness={staleness}",
        ],
    )
    os.environ["DAPO_KEEP_CHECKPOINTS"] = "0"  # keep every checkpoint for the evaluation
    assert LocalRun(spec, skip_eval=True).main() == 0
    run_dir = max(runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def step_times(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = rows[0]["time"] - rows[0]["train_s"]
    return {r["step"]: r["time"] - start for r in rows}


def seconds_to(run_dir: Path, target: float) -> float:
    rows = load_default_or_files(["default-task"], None, split="val")[:256]
    times = step_times(run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    for ckpt in ckpts:
        step = int(ckpt.name.split("_")[1])
        acc = evaluate_model_dir(
            ckpt,
            rows,
            EvalSpec(SamplingParams(n=2, top_p=1.0, max_new_tokens=16, seed=0)),
            progress=False,
        )["acc/mean@2"]
        print(f"   step {step:4d}  t={times.get(step, 0):6.1f}s  held-out acc {acc:.3f}")
        if acc >= target:
            return times[step]
    return -1.0


def samples_per_s(summary: dict, spec_tokens: int) -> float:
    return summary["steps"] * spec_tokens / summary["train_wall_s"]


def run() -> dict[str, float]:
    root = Path(".bench/e2e")
    spec = load_run_spec("cpu-small")
    per_step = spec.data.train_batch_size * spec.rollout.n
    run_dir, summary = train(STEPS_TO_80, root / "async", 50, 1)
    result = {
        "e2e.samples_per_s": samples_per_s(summary, per_step),
        "e2e.seconds_to_80pct": seconds_to(run_dir, 0.80),
    }
    _, sync = train(STEPS_RATIO, root / "onpolicy", 0, 0)
    _, asyn = train(STEPS_RATIO, root / "async-short", 0, 1)
    result["sync.ratio_async_vs_onpolicy"] = samples_per_s(asyn, per_step) / samples_per_s(
        sync, per_step
    )
    result["e2e.onpolicy_samples_per_s"] = samples_per_s(sync, per_step)
    return result
