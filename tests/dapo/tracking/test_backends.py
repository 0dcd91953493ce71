"""Each backend, read back with its own reader: what a training step, the run spec and a
held-out evaluation became in TensorBoard's event files, MLflow's file store and W&B's
offline run. Two processes log to a run one after the other (``dapo up`` evaluates, the
learner trains, ``dapo up`` evaluates again), so each test opens the backend three times."""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest

from dapo.tracking import TrackingRun, open_trackers
from proto.runspec import RunSpec

RUN_ID = "cpu-small-20260101-120000-ab12"
STEPS = [
    {"step": 1, "time": 1_800_000_001.0, "loss": 0.5, "acc_mean": 0.25,
     "staleness/tokens_lag_0": 100.0, "rollout_corr/k3_kl": 1e-4, "nan": float("nan")},
    {"step": 2, "time": 1_800_000_002.0, "loss": 0.25, "acc_mean": 0.5,
     "staleness/tokens_lag_0": 90.0, "rollout_corr/k3_kl": 2e-4, "nan": float("nan")},
]  # fmt: skip


def lifecycle(name: str, run_dir: Path) -> None:
    """Evaluation before training, two training steps, evaluation after, as a run does."""
    spec = RunSpec.model_validate(
        {"name": "cpu-small", "trainer": {"logger": [name], "project_name": "dapo-tests"}}
    )
    run = TrackingRun.of(spec, RUN_ID, run_dir)
    with open_trackers([name], run) as trackers:
        trackers.log_eval({"acc/mean@4": 0.4, "eval_s": 3.0}, 0)
    with open_trackers([name], run) as trackers:
        for figures in STEPS:
            trackers.log_metrics(figures, figures["step"])
    with open_trackers([name], run) as trackers:
        trackers.log_eval({"acc/mean@4": 0.6}, 2)
    assert not trackers.failures, trackers.failures


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    lifecycle("tensorboard", tmp_path)
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "acc_mean", "staleness/tokens_lag_0", "rollout_corr/k3_kl"} <= scalars
    assert {"val/acc/mean@4", "val/eval_s"} <= scalars
    assert not {"step", "time", "nan"} & scalars
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.wall_time for e in acc.Scalars("loss")] == [1_800_000_001.0, 1_800_000_002.0]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("val/acc/mean@4")] == [
        (0, 0.4),
        (2, 0.6),
    ]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert RUN_ID in text and "project_name: dapo-tests" in text


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    lifecycle("mlflow", tmp_path)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("dapo-tests")
    [run] = client.search_runs([exp.experiment_id])  # the three openings share one run
    assert run.info.run_name == RUN_ID and run.data.tags["dapo.run_id"] == RUN_ID
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.project_name"] == "dapo-tests"
    assert run.data.params["actor.clip_ratio_high"] == "0.28"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (1, 0.5, 1_800_000_001_000),
        (2, 0.25, 1_800_000_002_000),
    ]
    evals = client.get_metric_history(run.info.run_id, "val/acc/mean_at_4")
    assert sorted((m.step, m.value) for m in evals) == [(0, 0.4), (2, 0.6)]
    assert "rollout_corr/k3_kl" in run.data.metrics and "nan" not in run.data.metrics


def test_mlflow_follows_the_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    elsewhere = tmp_path / "server-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    lifecycle("mlflow", tmp_path / "run")
    assert not (tmp_path / "run" / "mlruns").exists()
    assert glob.glob(str(elsewhere / "*" / "*" / "metrics" / "loss"))


def _exited(path: Path) -> bool:
    from google.protobuf.message import DecodeError

    from tests.dapo.tracking.wandb_records import read_run

    try:
        return read_run(path)["exited"]
    except DecodeError:  # a record still being written
        return False


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.dapo.tracking.wandb_records import read_run

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing outside the test's folder
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    lifecycle("wandb", tmp_path)
    files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{RUN_ID}.wandb")))
    assert len(files) == 3  # offline, each process writes its own run folder, same run id
    # W&B's core process writes the log behind the client: a file is whole once it holds
    # the run's exit record, which may land a moment after finish() returned on a busy host
    deadline = time.monotonic() + 60
    while not all(_exited(Path(f)) for f in files):
        assert time.monotonic() < deadline, "a W&B run log never got its exit record"
        time.sleep(0.2)
    runs = [read_run(Path(f)) for f in files]
    for run in runs:
        assert (run["run"].run_id, run["run"].project) == (RUN_ID, "dapo-tests")
        assert run["run"].display_name == RUN_ID
        assert run["config"]["trainer"]["project_name"] == "dapo-tests"
    history = [h for run in runs for h in run["history"]]
    steps = sorted((h for h in history if "loss" in h), key=lambda h: h["_step"])
    assert [(h["_step"], h["loss"], h["acc_mean"]) for h in steps] == [
        (1, 0.5, 0.25),
        (2, 0.25, 0.5),
    ]
    assert steps[0]["rollout_corr/k3_kl"] == 1e-4
    assert "nan" not in steps[0] and "step" not in steps[0]
    evals = sorted((h["val/step"], h["val/acc/mean@4"]) for h in history if "val/step" in h)
    assert evals == [(0, 0.4), (2, 0.6)]


def test_wandb_mode_follows_the_environment(monkeypatch):
    from dapo.tracking.wandb_backend import wandb_id, wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"  # no key: nothing leaves the machine
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    assert wandb_id("a/b:c d") == "a-b-c-d"
