"""The ``tensorboard`` logger: event files in ``<run folder>/tensorboard/``.

``tensorboard --logdir runs`` then shows every run side by side. Each process that logs
(the learner for training steps, ``dapo up`` for the held-out evaluations) writes its own
event file into the same folder, which TensorBoard reads as one run.
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from dapo.tracking.trackers import TrackingRun

SUBDIR = "tensorboard"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run: TrackingRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run.run_dir / SUBDIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)
        spec = yaml.safe_dump(dict(run.config), sort_keys=False)
        # indented four spaces: TensorBoard renders text as Markdown, this as a code block
        text = "\n".join("    " + line for line in spec.splitlines())
        self.writer.add_text("config", f"run `{run.run_id}`\n\n{text}", 0)
        self.writer.flush()

    def log_metrics(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step, walltime=time_s)
        self.writer.flush()

    def log_eval(self, figures: Mapping[str, float], step: int) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
