"""The learner sends every step's figures to the run's trackers, exactly the metrics.jsonl
line; a tracker that fails does not stop training; a learner asked for a logger whose
package is missing refuses to start with a ConfigError naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dapo.runtime.config import ConfigError
from dapo.runtime.runs import MemoryRunStore
from dapo.tracking import Trackers
from dapo.transport.memory_bus import MemoryBus
from proto.runspec import RunSpec
from services.learner.main import run_trackers
from tests.dapo.tracking.test_trackers import Broken, Recorder
from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec
from tests.services.learner.test_service import batch, publish_batch, start_learner, train_next


def test_each_step_reaches_the_trackers_and_a_failing_one_is_only_counted(tmp_path):
    runs = tmp_path / "runs"
    spec = small_spec(make_model_dir(tmp_path / "model"), make_dataset(tmp_path / "d.jsonl"),
                      runs, trainer={"total_training_steps": 2, "save_freq": 0,
                                     "runs_dir": str(runs)})  # fmt: skip
    store = MemoryRunStore()
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    bus = MemoryBus(run_id)
    for i in range(2):
        publish_batch(bus, batch(run_id, i))
    loop = start_learner(spec, store, bus)
    recorder = Recorder()
    loop.trackers = Trackers([Broken(), recorder])
    train_next(loop)
    train_next(loop)
    assert loop.step == 2  # the broken tracker stopped nothing
    assert loop.trackers.failures["broken"] == 2
    lines = metrics_lines(runs / run_id)
    assert [step for _, step, _ in recorder.steps] == [1, 2]
    for line, (figures, _, time_s) in zip(lines, recorder.steps, strict=True):
        assert time_s == line["time"]
        assert figures == {k: v for k, v in line.items() if k not in ("step", "time")}
    assert {"loss", "acc_mean", "staleness/tokens_lag_0", "train_s"} <= set(recorder.steps[0][0])


def test_run_trackers_opens_and_closes_them(tmp_path, capsys):
    spec = RunSpec.model_validate({"trainer": {"logger": ["console"]}})
    with run_trackers(spec, "r1", tmp_path) as trackers:
        assert trackers.names == ["console"]
        trackers.log_metrics({"step": 1, "loss": 0.5}, 1)
    assert "step:1 - loss:0.5" in capsys.readouterr().out


def test_a_learner_without_the_package_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    spec = RunSpec.model_validate({"trainer": {"logger": ["console", "mlflow"]}})
    with pytest.raises(ConfigError, match=r"mlflow package.*\[tracking\]"):
        with run_trackers(spec, "r1", Path(tmp_path)):
            pass
