"""TRL's GRPOTrainer on the same model, task and batch as ``configs/cpu-small.yaml``.

A reference point for ``e2e.samples_per_s``: TRL is installed into its own virtualenv
(``.bench/trl-venv``, created once with the pins below; ``torch`` first and pinned so pip
takes the CPU wheel) and ``bench/trl_grpo_run.py`` trains there on the default task's
model and train prompts, rendered exactly as the sampler renders them, with the
project's verifier as the reward. The project package is not installed in that venv; the
script puts the repository root on ``sys.path`` and imports only the verifier.

Figures:

- ``trl.samples_per_s``: completions trained per second of TRL training wall time over
  the timed optimizer steps (16 prompts x 8 completions each), excluding model loading
  and warm-up steps;
- ``e2e.vs_trl_ratio``: ``e2e.samples_per_s`` from ``.bench/results.json`` (when present)
  over ``trl.samples_per_s``.

Environment: ``DAPO_BENCH_TRL_STEPS`` (timed steps, default 30), ``DAPO_BENCH_TRL_WARMUP``
(default 3), ``DAPO_BENCH_TRL_TIMEOUT_S`` (default 300).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".bench"
VENV = BENCH_DIR / "trl-venv"
SCRIPT = REPO / "bench" / "trl_grpo_run.py"
RESULTS = BENCH_DIR / "results.json"

TORCH_PIN = "torch==2.13.0"
"""Installed alone and first: with it in place pip never pulls a CUDA build of torch."""
TRL_PINS = ("trl==1.16.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0")
"""Versions found to install and run together on CPU (Python 3.11)."""

STEPS = int(os.environ.get("DAPO_BENCH_TRL_STEPS", "30"))
WARMUP = int(os.environ.get("DAPO_BENCH_TRL_WARMUP", "3"))
TIMEOUT_S = float(os.environ.get("DAPO_BENCH_TRL_TIMEOUT_S", "300"))
THREADS = 2


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _stamp_text() -> str:
    return "\n".join((TORCH_PIN, *TRL_PINS)) + "\n"


def _pip(*args: str) -> None:
    cmd = [str(_venv_python()), "-m", "pip", "install", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"cannot install {' '.join(args)} into {VENV}: pip exited {proc.returncode}:\n"
            f"{proc.stderr[-2000:]}"
        )


def ensure_venv() -> Path:
    """Create ``.bench/trl-venv`` with the pinned packages once; return its python."""
    stamp = VENV / ".trl-bench-stamp"
    if stamp.is_file() and stamp.read_text() == _stamp_text() and _venv_python().is_file():
        return _venv_python()
    proc = subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(VENV)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python -m venv {VENV} failed:\n{proc.stderr[-2000:]}")
    _pip(TORCH_PIN)
    _pip(TORCH_PIN, *TRL_PINS)  # torch repeated so the resolver keeps the installed CPU build
    stamp.write_text(_stamp_text())
    return _venv_python()


def write_prompts(path: Path) -> Path:
    """The default task's train rows as the sampler's prompt text; returns the model dir."""
    from transformers import AutoTokenizer

    from dapo.data.dataset import load_default_or_files, render_prompt
    from dapo.data.task import prepare_default_task
    from dapo.runtime.config import load_run_spec

    spec = load_run_spec("cpu-small")
    model_dir = prepare_default_task(progress=False).model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = load_default_or_files(spec.data.train_files, None, split="train")
    payload = [
        {
            "prompt": render_prompt(
                row,
                tokenizer,
                template=spec.data.prompt_template,
                apply_chat_template=spec.data.apply_chat_template,
            ),
            "ground_truth": row.ground_truth,
        }
        for row in rows
    ]
    path.write_text(json.dumps(payload))
    return model_dir


def parse_result(stdout: str) -> dict:
    """The last JSON object line the script printed."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"samples_per_s"' in line:
            return json.loads(line)
    raise RuntimeError(f"{SCRIPT.name} printed no result line; stdout tail:\n{stdout[-2000:]}")


def run_trl(python: Path, model_dir: Path, prompts: Path) -> dict:
    cmd = [
        str(python),
        str(SCRIPT),
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--steps",
        str(STEPS),
        "--warmup",
        str(WARMUP),
        "--threads",
        str(THREADS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # the script must see only its own venv and the repo root
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"TRL GRPO run exceeded {TIMEOUT_S:.0f} s ({STEPS} steps)") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"TRL GRPO run exited {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
        )
    return parse_result(proc.stdout)


def run() -> dict[str, float]:
    BENCH_DIR.mkdir(exist_ok=True)
    python = ensure_venv()
    prompts = BENCH_DIR / "trl-prompts.json"
    model_dir = write_prompts(prompts)
    result = run_trl(python, model_dir, prompts)
    print(f"   TRL {result['trl_version']}: {result['steps']} steps in {result['seconds']:.1f} s")
    trl_rate = float(result["samples_per_s"])
    figures = {"trl.samples_per_s": trl_rate}
    ours = json.loads(RESULTS.read_text()).get("e2e.samples_per_s") if RESULTS.is_file() else None
    if ours is not None:
        figures["e2e.vs_trl_ratio"] = float(ours) / trl_rate
    return figures
