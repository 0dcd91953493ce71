"""The ``console`` logger: every figure of a step on one line, as verl's console logger
prints it, so a service log alone tells the whole story of a run."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

from dapo.tracking.trackers import TrackingRun


def format_line(prefix: str, step: int, figures: Mapping[str, float]) -> str:
    parts = [f"{k}:{v:.6g}" for k, v in sorted(figures.items())]
    return " - ".join([f"{prefix}step:{step}", *parts])


class ConsoleTracker:
    name = "console"

    def __init__(self, run: TrackingRun, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.run_id = run.run_id

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def log_metrics(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        self._print(format_line("", step, figures))

    def log_eval(self, figures: Mapping[str, float], step: int) -> None:
        self._print(format_line("eval ", step, figures))

    def close(self) -> None:
        pass
