"""The trackers of a run (verl's ``trainer.logger``) behind one object that never raises.

Training must not depend on a dashboard: a backend that fails (a full disk, a network
hiccup on the way to W&B, an MLflow server that went away) is logged once with its error
and then only counted, and every other backend and the training step go on. A backend
whose package is missing is another matter: that is a mistake in the run's set-up, found
before anything starts (``check_available``), with the pip extra that fixes it.

Each backend module imports its package only when the backend is opened, so importing
``dapo.tracking`` costs nothing and works without any of them installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from proto.runspec import RunSpec

log = logging.getLogger(__name__)

EXTRA = "tracking"
"""The optional dependency group of pyproject.toml that brings every backend's package."""

BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "console": ("dapo.tracking.console", "ConsoleTracker", None),
    "tensorboard": ("dapo.tracking.tensorboard_backend", "TensorBoardTracker", "tensorboard"),
    "wandb": ("dapo.tracking.wandb_backend", "WandbTracker", "wandb"),
    "mlflow": ("dapo.tracking.mlflow_backend", "MlflowTracker", "mlflow"),
}
"""logger name -> (module, class, the package it needs)."""

SKIPPED_FIGURES = frozenset({"step", "time"})
"""Per-step fields that are the axes of a series rather than series: the step is the x of
every point and the time its timestamp (a float32 dashboard would also round it to minutes)."""

EVAL_PREFIX = "val/"
"""Held-out evaluations are their own series, ``val/acc/mean@4`` beside ``acc_mean``."""


class TrackerUnavailable(ImportError):
    """A logger was asked for whose package is not installed."""


@dataclass(frozen=True)
class TrackingRun:
    """What every backend needs to know about the run it records."""

    run_dir: Path
    run_id: str
    project: str
    experiment: str
    config: Mapping[str, Any]
    """The run spec as JSON-compatible data (parameters in MLflow, config in W&B)."""

    @classmethod
    def of(cls, spec: RunSpec, run_id: str, run_dir: Path) -> TrackingRun:
        t = spec.trainer
        return cls(
            run_dir=Path(run_dir),
            run_id=run_id,
            project=t.project_name,
            experiment=t.experiment_name or run_id,
            config=spec.model_dump(mode="json"),
        )


class Tracker(Protocol):
    """One backend. Every method may raise: ``Trackers`` contains it."""

    name: str

    def log_metrics(self, figures: Mapping[str, float], step: int, time_s: float | None) -> None:
        """One training step's figures (finite numbers only, axes removed)."""

    def log_eval(self, figures: Mapping[str, float], step: int) -> None:
        """A held-out evaluation of the policy after ``step`` training steps; names carry
        ``EVAL_PREFIX`` already."""

    def close(self) -> None: ...


def check_available(names: Sequence[str]) -> None:
    """Raise ``TrackerUnavailable`` naming the extra if a requested backend's package is
    missing (without importing it: a heavy import is paid only by the process that logs)."""
    for name in names:
        if name not in BACKENDS:
            raise TrackerUnavailable(f"trainer.logger: unknown logger {name!r}")
        package = BACKENDS[name][2]
        if package is not None and importlib.util.find_spec(package) is None:
            raise TrackerUnavailable(
                f"trainer.logger includes {name!r}, but the {package} package is not "
                f"installed: install the '{EXTRA}' extra (pip install -e '.[{EXTRA}]')"
            )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted names the run spec's overrides use."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def finite_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """The plottable part of a figures dict: finite numbers (bools as 0/1), axes left out."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        if key in SKIPPED_FIGURES or not isinstance(value, int | float):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


@dataclass
class Trackers:
    """Every backend of a run. A backend's failure is logged the first time with its
    traceback, counted in ``failures`` every time, and never raised."""

    backends: list[Tracker] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log_metrics(self, figures: Mapping[str, Any], step: int) -> None:
        """One training step: the same figures as its metrics.jsonl line."""
        numbers = finite_figures(figures)
        t = figures.get("time")
        time_s = float(t) if isinstance(t, int | float) else None
        self._each("log_metrics", lambda b: b.log_metrics(numbers, step, time_s))

    def log_eval(self, figures: Mapping[str, Any], step: int) -> None:
        """A held-out evaluation, as its own ``val/...`` series at training step ``step``."""
        numbers = {EVAL_PREFIX + k: v for k, v in finite_figures(figures).items()}
        self._each("log_eval", lambda b: b.log_eval(numbers, step))

    def close(self) -> None:
        self._each("close", lambda b: b.close())

    def fail(self, name: str, what: str, exc: BaseException) -> None:
        if not self.failures[name]:
            log.error("tracker %s failed in %s (counted, not raised again): %r", name, what, exc,
                      exc_info=exc)  # fmt: skip
        self.failures[name] += 1

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for backend in self.backends:
            try:
                call(backend)
            except Exception as exc:  # a dashboard never stops training
                self.fail(backend.name, what, exc)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trackers(names: Sequence[str], run: TrackingRun) -> Trackers:
    """Open each requested backend (raising ``TrackerUnavailable`` first if a package is
    missing). A backend that fails to open is counted and left out; the others go on."""
    check_available(names)
    trackers = Trackers()
    for name in dict.fromkeys(names):
        module, cls, _ = BACKENDS[name]
        try:
            backend = getattr(importlib.import_module(module), cls)(run)
        except Exception as exc:
            trackers.fail(name, "open", exc)
            continue
        trackers.backends.append(backend)
    return trackers
