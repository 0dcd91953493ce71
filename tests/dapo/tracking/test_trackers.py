"""The fan-out of trackers: it never raises, logs a failing backend once and counts it; a
missing package is refused up front with the extra that brings it; ``trainer.logger`` and
its names are validated like the rest of the run spec."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dapo.tracking import Trackers, TrackerUnavailable, TrackingRun, check_available, open_trackers
from dapo.tracking.console import ConsoleTracker
from dapo.tracking.trackers import finite_figures, flatten
from proto.runspec import RunSpec, TrainerConfig

REPO = Path(__file__).resolve().parents[3]


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[tuple[dict, int, float | None]] = []
        self.evals: list[tuple[dict, int]] = []
        self.closed = False

    def log_metrics(self, figures, step, time_s):
        self.steps.append((dict(figures), step, time_s))

    def log_eval(self, figures, step):
        self.evals.append((dict(figures), step))

    def close(self):
        self.closed = True


class Broken(Recorder):
    name = "broken"

    def log_metrics(self, figures, step, time_s):
        raise OSError("disk full")

    def close(self):
        raise OSError("disk still full")


def run_info(tmp_path: Path, **trainer) -> TrackingRun:
    spec = RunSpec.model_validate({"trainer": trainer})
    return TrackingRun.of(spec, "dapo-20260101-000000-abcd", tmp_path)


def test_a_failing_backend_is_logged_once_counted_and_never_raised(caplog):
    good, bad = Recorder(), Broken()
    trackers = Trackers([bad, good])
    with caplog.at_level(logging.ERROR, logger="dapo.tracking.trackers"):
        for step in (1, 2, 3):
            trackers.log_metrics({"loss": 0.5, "step": step, "time": 100.0 + step}, step)
        trackers.close()
    assert [s for _, s, _ in good.steps] == [1, 2, 3]  # the other backend got every step
    assert good.steps[0] == ({"loss": 0.5}, 1, 101.0)  # axes are not series
    assert good.closed
    assert trackers.failures["broken"] == 4  # three steps and the close
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "broken" in errors[0].getMessage()
    assert "disk full" in errors[0].getMessage()


def test_evaluations_are_their_own_series():
    rec = Recorder()
    Trackers([rec]).log_eval({"acc/mean@4": 0.5, "problems": 512, "note": "x"}, 40)
    assert rec.evals == [({"val/acc/mean@4": 0.5, "val/problems": 512.0}, 40)]


def test_only_finite_numbers_are_figures():
    figures = {"a": 1, "b": float("nan"), "c": float("inf"), "d": "text", "e": True, "step": 3}
    assert finite_figures(figures) == {"a": 1.0, "e": 1.0}
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


def test_console_prints_every_figure_on_one_line(tmp_path):
    out = io.StringIO()
    console = ConsoleTracker(run_info(tmp_path), stream=out)
    trackers = Trackers([console])
    trackers.log_metrics({"step": 7, "loss": 0.25, "reward_mean": 1.0}, 7)
    trackers.log_eval({"acc/mean@4": 0.75}, 7)
    lines = out.getvalue().splitlines()
    assert lines == ["step:7 - loss:0.25 - reward_mean:1", "eval step:7 - val/acc/mean@4:0.75"]


def test_a_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then answers "not installed"
    check_available(["console"])
    with pytest.raises(TrackerUnavailable, match=r"wandb package.*'tracking' extra"):
        check_available(["console", "wandb"])
    with pytest.raises(TrackerUnavailable):
        open_trackers(["wandb"], run_info(tmp_path))


def test_a_backend_that_fails_to_open_is_left_out(monkeypatch, tmp_path, caplog):
    def refuse(run):
        raise RuntimeError("no route to host")

    monkeypatch.setattr("dapo.tracking.console.ConsoleTracker", refuse)
    with caplog.at_level(logging.ERROR):
        trackers = open_trackers(["console"], run_info(tmp_path))
    assert trackers.names == [] and trackers.failures["console"] == 1
    trackers.log_metrics({"loss": 1.0}, 1)  # nothing left to fail


def test_tracking_run_names_follow_the_spec(tmp_path):
    run = run_info(tmp_path, project_name="ablation", experiment_name="clip-higher")
    assert (run.project, run.experiment, run.run_id) == (
        "ablation",
        "clip-higher",
        "dapo-20260101-000000-abcd",
    )
    assert run.config["trainer"]["project_name"] == "ablation"
    assert run_info(tmp_path).experiment == "dapo-20260101-000000-abcd"  # default: the run id


def test_trainer_logger_is_validated():
    assert TrainerConfig().logger == ["console"]
    assert TrainerConfig(logger="wandb").logger == ["wandb"]  # verl accepts a single name
    assert TrainerConfig(logger=["console", "tensorboard", "wandb", "mlflow"]).logger[-1] == (
        "mlflow"
    )
    assert TrainerConfig(logger=[]).logger == []
    for bad in (["comet"], ["wandb", "wandb"], "", ["console"] * 5):
        with pytest.raises(ValidationError):
            TrainerConfig(logger=bad)
    with pytest.raises(ValidationError, match="more than once"):
        TrainerConfig(logger=["wandb", "console", "wandb"])


@pytest.mark.parametrize("field", ["project_name", "experiment_name"])
def test_tracker_names_are_bounded_and_plain(field):
    assert getattr(TrainerConfig(**{field: "DAPO-Qwen2.5_32B"}), field) == "DAPO-Qwen2.5_32B"
    for bad in ("", "a/b", "x" * 129, "has space", "-leading", "é"):
        with pytest.raises(ValidationError):
            TrainerConfig(**{field: bad})


def test_the_logger_override_reads_as_verl_writes_it():
    from dapo.runtime.config import load_run_spec

    spec = load_run_spec(None, ["trainer.logger=[console,tensorboard]",
                                "trainer.project_name=ablation"], environ={})  # fmt: skip
    assert spec.trainer.logger == ["console", "tensorboard"]
    spec = load_run_spec(None, [], environ={"DAPO_SPEC__TRAINER__LOGGER": "mlflow"})
    assert spec.trainer.logger == ["mlflow"]


def test_importing_dapo_needs_no_tracking_package():
    blocked = ("wandb", "mlflow", "tensorboard")
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import dapo.tracking, dapo.cli.main, dapo.cli.local, services.learner.main\n"
        "from dapo.tracking import check_available\n"
        "check_available(['console'])\n"
        f"assert not any(m in sys.modules and sys.modules[m] for m in {blocked!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
