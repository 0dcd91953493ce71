"""The ``mlflow`` logger: one MLflow run per training run, parameters = the run spec.

Where: ``MLFLOW_TRACKING_URI`` when set (a tracking server, a database), else a file store
in ``<run folder>/mlruns`` (MLflow keeps that backend in maintenance mode and asks for
``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this process unless set otherwise; read
it with ``mlflow ui --backend-store-uri runs/<id>/mlruns``). The experiment is
``trainer.project_name``, the run's name ``trainer.experiment_name``; the run carries the
tag ``dapo.run_id``, by which every process that logs to it (the learner, ``dapo up`` for
evaluations, a restarted learner) finds the same MLflow run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping

from dapo.tracking.trackers import TrackingRun, flatten

RUN_TAG = "dapo.run_id"
MAX_PARAMS = 100
"""MLflow's limit of parameters per batch call."""
MAX_PARAM_LEN = 6000


def metric_name(key: str) -> str:
    """MLflow names allow letters, digits, ``_ - . / :`` and spaces: ``acc/mean@4`` becomes
    ``acc/mean_at_4`` (verl's spelling), anything else an underscore."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def tracking_uri(run: TrackingRun) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run.run_dir / "mlruns").resolve().as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run: TrackingRun) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(run))
        experiment_id = self._experiment(run.project)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run.run_id}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
        else:
            created = self.client.create_run(
                experiment_id, run_name=run.experiment, tags={RUN_TAG: run.run_id}
            )
            self.run_id = created.info.run_id
            self._log_params(run.config)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another process created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, config: Mapping) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS])

    def _log(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        from mlflow.entities import Metric

        ms = int((time.time() if time_s is None else time_s) * 1000)
        metrics = [Metric(metric_name(k), v, ms, step) for k, v in figures.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_metrics(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        self._log(figures, step, time_s)

    def log_eval(self, figures: Mapping[str, float], step: int) -> None:
        self._log(figures, step, None)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
