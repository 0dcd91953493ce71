"""`dapo up` (what `make run` calls) from the command line: it prepares the default task,
trains, evaluates before and after, writes the run folder and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dapo_up_short_run_writes_the_run_folder(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dapo.cli",
            "up",
            "--config",
            "cpu-small",
            "--eval-n",
            "1",
            "trainer.total_training_steps=20",
            "trainer.save_freq=10",
            f"trainer.runs_dir={runs}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = list(runs.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["wall_s"] > 0
    assert 0.0 <= summary["acc_before"] <= 1.0 and 0.0 <= summary["acc_after"] <= 1.0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "api_token"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "step_000020" / "model.safetensors").is_file()
    leftovers = subprocess.run(["pgrep", "-f", "dapo.cli service"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "service processes outlived dapo up"
