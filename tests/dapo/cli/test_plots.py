"""``dapo plot``: the panels a run's data calls for, smoothed, against step or wall time,
with the held-out evaluations, from synthetic run folders shaped as ``dapo up`` writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from dapo.cli.main import main as dapo
from dapo.cli.plots import HELD_OUT, LAG_PANEL, Axis, ema, load_run, plot_run, plot_runs

PNG = b"\x89PNG\r\n\x1a\n"
T0 = 1_800_000_000.0


def make_run(
    root: Path,
    name: str = "cpu-small",
    stamp: str = "20260101-120000-ab12",
    steps: int = 30,
    *,
    off_policy: bool = True,
    evals: list[tuple[int, float]] | None = None,
    summary: bool = True,
    slope: float = 0.01,
) -> Path:
    """A run folder: config.yaml, metrics.jsonl, and optionally summary.json and evals.jsonl."""
    run_id = f"{name}-{stamp}"
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": name, "spec_version": 1}))
    lines = []
    for s in range(1, steps + 1):
        row = {
            "step": s, "time": T0 + 2.0 * s, "train_s": 0.5,
            "acc_mean": 0.4 + slope * s + 0.05 * math.sin(s), "reward_mean": 0.1 * s,
            "entropy": 0.2 - 0.001 * s, "response_length_mean": 11.0, "overlong_frac": 0.0,
            "kept_ratio": 0.8, "pg_clipfrac_high": 0.01, "version_lag": s % 2,
        }  # fmt: skip
        if off_policy:
            row.update({"staleness/tokens_lag_0": 60.0, "staleness/tokens_lag_1": 40.0,
                        "staleness/tokens_lag_2": 0.0, "staleness/tokens_lag_3plus": 0.0,
                        "rollout_corr/rollout_is_mean": 1.0, "rollout_corr/k3_kl": 1e-4})  # fmt: skip
        lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        figures = {"run_id": run_id, "steps": steps, "wall_s": 2.0 * steps + 20,
                   "train_wall_s": 2.0 * steps, "trained_samples_per_s": 64.0,
                   "train_start": T0, "eval_k": 4, "acc_before": 0.4,
                   "acc_after": 0.4 + slope * steps}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(figures))
    if evals is not None:
        (run_dir / "evals.jsonl").write_text(
            "".join(json.dumps({"step": s, "kind": "x", "acc/mean@4": a}) + "\n" for s, a in evals)
        )
    return run_dir


def test_a_full_run_gets_every_panel(tmp_path):
    run = make_run(tmp_path, evals=[(0, 0.4), (10, 0.5), (20, 0.55), (30, 0.6)])
    plot = plot_runs([run], tmp_path / "curves.png")
    assert plot.path.read_bytes()[:8] == PNG
    assert plot.titles == [
        HELD_OUT,
        "accuracy (train samples)",
        "reward",
        "entropy",
        "response length (tokens)",
        "truncated samples (share)",
        "kept-group ratio",
        "clipped above 1 + ε_high (share)",
        "importance weight proximal / behaviour",
        "KL behaviour ‖ learner (k3)",
        LAG_PANEL,
    ]
    assert load_run(run).evals == [(0, 0.4), (10, 0.5), (20, 0.55), (30, 0.6)]


def test_panels_follow_the_data(tmp_path):
    run = make_run(tmp_path, off_policy=False, summary=False)
    plot = plot_runs([run], tmp_path / "curves.png", x="time")
    assert HELD_OUT not in plot.titles  # no evaluation anywhere
    assert "importance weight proximal / behaviour" not in plot.titles
    assert LAG_PANEL in plot.titles  # drawn from version_lag when there is no distribution
    assert load_run(run).label == "cpu-small (20260101-120000-ab12)"


def test_held_out_points_fall_back_to_the_summary(tmp_path):
    run = load_run(make_run(tmp_path, steps=20))
    assert run.evals == [(0, 0.4), (20, pytest.approx(0.6))] and run.eval_key == "acc/mean@4"


def test_the_command_rewrites_curves_png_with_options(tmp_path, capsys):
    run = make_run(tmp_path)
    assert dapo(["plot", str(run), "--x", "time", "--smooth", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    assert (run / "curves.png").read_bytes()[:8] == PNG


def test_wall_time_axis_starts_at_training_start(tmp_path):
    run = load_run(make_run(tmp_path, steps=5))
    axis = Axis.of("time", [run])
    assert axis.xs(run, run.rows) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert axis.at_step(run, 0) == 0.0 and axis.at_step(run, 3) == 6.0
    assert "wall time" in axis.label and "(s)" in axis.label
    assert Axis.of("step", [run]).at_step(run, 3) == 3.0
    long = load_run(make_run(tmp_path, stamp="20260101-130000-cd34", steps=400))
    assert Axis.of("time", [long]).scale == 60.0  # minutes past ten minutes
    with pytest.raises(ValueError, match="step' or 'time"):
        Axis.of("tokens", [run])


def test_ema_is_debiased_and_smooths():
    assert ema([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards 0
    assert ema([0.0, 10.0], 0.0) == [0.0, 10.0]
    smoothed = ema([0.0, 1.0] * 50, 0.9)
    assert max(smoothed[50:]) - min(smoothed[50:]) < 0.2


def test_bad_inputs_say_what(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    with pytest.raises(ValueError, match="smoothing"):
        plot_runs([make_run(tmp_path)], tmp_path / "x.png", smooth=1.0)


def test_a_torn_last_metrics_line_is_left_out(tmp_path):
    from dapo.cli.plots import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError):
        read_metrics(tmp_path)
