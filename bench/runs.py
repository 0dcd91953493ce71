"""Training runs of the default task for the benchmarks, and their accuracy over time.

A run goes through ``dapo.cli.local.LocalRun`` (the same path as ``make run``) without the
before/after evaluation; afterwards each saved checkpoint is evaluated on the same 256
held-out problems (2 samples each, temperature 1, top_p 1), so the evaluation never slows
training and every setting is judged on the same data.
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

EVAL = EvalSpec(SamplingParams(n=2, top_p=1.0, max_new_tokens=16, seed=0))
EVAL_PROBLEMS = 256


def train(runs_dir: Path, overrides: list[str]) -> tuple[Path, dict]:
    """One ``cpu-small`` run with ``overrides``, every checkpoint kept; (run dir, summary)."""
    spec = load_run_spec("cpu-small", [*overrides, f"trainer.runs_dir={runs_dir}"])
    os.environ["DAPO_KEEP_CHECKPOINTS"] = "0"  # keep every checkpoint for the evaluation
    assert LocalRun(spec, skip_eval=True).main() == 0
    run_dir = max(runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def step_times(run_dir: Path) -> dict[int, float]:
    """Training seconds from the start of the run to the end of each step."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = rows[0]["time"] - rows[0]["train_s"]
    return {int(r["step"]): r["time"] - start for r in rows}


def accuracy_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds, held-out acc/mean@2) of every checkpoint, in step order."""
    rows = load_default_or_files(["default-task"], None, split="val")[:EVAL_PROBLEMS]
    times = step_times(run_dir)
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        acc = evaluate_model_dir(ckpt, rows, EVAL, progress=False)["acc/mean@2"]
        curve.append((step, times.get(step, 0.0), acc))
        print(f"   {run_dir.name}: step {step:4d}  t={curve[-1][1]:6.1f}s  held-out acc {acc:.3f}")
    return curve


def seconds_to(curve: list[tuple[int, float, float]], target: float) -> float:
    """Training seconds until a checkpoint first reaches ``target`` accuracy; -1 if none."""
    return next((t for _, t, acc in curve if acc >= target), -1.0)


def samples_per_s(summary: dict, samples_per_step: int) -> float:
    return summary["steps"] * samples_per_step / summary["train_wall_s"]
