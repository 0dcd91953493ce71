"""``dapo up``'s held-out evaluations: before training, every ``trainer.test_freq`` steps
(the checkpoints of those steps, evaluated after the run) and after; each one a line of
evals.jsonl, which ``dapo plot`` draws, and a ``val/...`` point of the trackers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dapo.cli.local import (
    EvalPoint,
    LocalRun,
    check_trackers,
    checkpoint_step,
    periodic_checkpoints,
    warn_test_freq,
)
from dapo.cli.plots import load_run
from dapo.runtime.config import ConfigError
from proto.runspec import RunSpec


def make_checkpoints(run_dir: Path, steps: list[int]) -> None:
    for step in steps:
        (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000030.tmp").mkdir()  # a save in progress: not one


def test_periodic_checkpoints_are_the_multiples_of_test_freq_before_the_last(tmp_path):
    make_checkpoints(tmp_path, [10, 20, 30, 40, 50, 60])
    found = periodic_checkpoints(tmp_path, 20, final_step=60)
    assert [(s, p.name) for s, p in found] == [(20, "step_000020"), (40, "step_000040")]
    assert periodic_checkpoints(tmp_path, 0, final_step=60) == []
    assert checkpoint_step(tmp_path / "checkpoints" / "step_000040") == 40
    with pytest.raises(ValueError):
        checkpoint_step(tmp_path / "checkpoints" / "latest")


def test_evaluate_after_runs_the_periodic_then_the_final_evaluation(tmp_path, monkeypatch):
    make_checkpoints(tmp_path, [25, 50, 75, 100])
    spec = RunSpec.model_validate({"trainer": {"test_freq": 50, "save_freq": 25}})
    seen = []

    def fake_evaluate(self, model_dir, desc):
        seen.append(Path(model_dir).name)
        return {"acc/mean@4": len(seen) / 10}

    monkeypatch.setattr(LocalRun, "evaluate", fake_evaluate)
    final = tmp_path / "checkpoints" / "step_000100"
    points = LocalRun(spec).evaluate_after(tmp_path, final)
    assert seen == ["step_000050", "step_000100"]
    assert [(p.step, p.kind) for p in points] == [(50, "periodic"), (100, "after")]
    assert LocalRun(spec, skip_eval=True).evaluate_after(tmp_path, final) == []
    assert LocalRun(spec, skip_eval=True).test_freq == 0


def test_recorded_evaluations_reach_evals_jsonl_and_the_trackers(tmp_path, capsys):
    spec = RunSpec.model_validate({"name": "toy", "trainer": {"logger": ["console"]}})
    run_dir = tmp_path / "toy-20260101-000000-abcd"
    run_dir.mkdir()
    local = LocalRun(spec)
    local.record_evals("toy-20260101-000000-abcd", run_dir,
                       [EvalPoint(0, "before", None, {"acc/mean@4": 0.25})])  # fmt: skip
    after = [EvalPoint(4, "periodic", run_dir / "checkpoints" / "step_000004", {"acc/mean@4": 0.5}),
             EvalPoint(8, "after", run_dir / "checkpoints" / "step_000008", {"acc/mean@4": 0.75})]  # fmt: skip
    local.record_evals("toy-20260101-000000-abcd", run_dir, after)
    lines = [json.loads(x) for x in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [(x["step"], x["kind"], x["acc/mean@4"]) for x in lines] == [
        (0, "before", 0.25),
        (4, "periodic", 0.5),
        (8, "after", 0.75),
    ]
    assert lines[0]["checkpoint"] is None and lines[2]["checkpoint"].endswith("step_000008")
    out = capsys.readouterr().out
    assert "eval step:0 - val/acc/mean@4:0.25" in out
    assert "eval step:8 - val/acc/mean@4:0.75" in out
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0}) + "\n")
    run = load_run(run_dir)  # what the plots read back
    assert run.evals == [(0, 0.25), (4, 0.5), (8, 0.75)] and run.eval_key == "acc/mean@4"


def test_a_missing_tracker_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    spec = RunSpec.model_validate({"trainer": {"logger": ["tensorboard"]}})
    with pytest.raises(ConfigError, match="tensorboard package"):
        check_trackers(spec)
    check_trackers(RunSpec())  # console alone needs nothing


def test_a_test_freq_the_checkpoints_cannot_serve_is_announced(capsys):
    spec = RunSpec.model_validate({"trainer": {"test_freq": 10, "save_freq": 25}})
    warn_test_freq(spec, 10)
    assert "every 50 steps" in capsys.readouterr().err
    spec = RunSpec.model_validate({"trainer": {"test_freq": 50, "save_freq": 25}})
    warn_test_freq(spec, 50)
    assert capsys.readouterr().err == ""
