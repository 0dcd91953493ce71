"""The ``wandb`` logger: one W&B run per training run, config = the run spec.

Mode: ``WANDB_MODE`` when set; else online when ``WANDB_API_KEY`` is set, offline without
one (no account, no network: the run is written to ``<run folder>/wandb/offline-run-*/``,
and ``wandb sync`` uploads it later). The W&B run id is the run id, with ``resume="allow"``,
so the processes that log to a run one after another (``dapo up`` for the evaluation before
training, the learner, a restarted learner, ``dapo up`` again for the evaluations after) add
to one W&B run online. Evaluations are plotted against their own step metric ``val/step``,
because W&B refuses points at a step lower than one already logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from dapo.tracking.trackers import EVAL_PREFIX, TrackingRun

EVAL_STEP = f"{EVAL_PREFIX}step"


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_id(run_id: str) -> str:
    """W&B run ids may not contain ``:;,#?/'``."""
    return re.sub(r"[:;,#?/'\s]", "-", run_id)


class WandbTracker:
    name = "wandb"

    def __init__(self, run: TrackingRun) -> None:
        import wandb

        self.run = wandb.init(
            project=run.project,
            name=run.experiment,
            id=wandb_id(run.run_id),
            resume="allow",
            dir=str(run.run_dir),
            mode=wandb_mode(),
            config=dict(run.config),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric(EVAL_STEP)
        self.run.define_metric(f"{EVAL_PREFIX}*", step_metric=EVAL_STEP)

    def log_metrics(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        self.run.log(dict(figures), step=step)

    def log_eval(self, figures: Mapping[str, float], step: int) -> None:
        self.run.log({**figures, EVAL_STEP: step})

    def close(self) -> None:
        self.run.finish()
