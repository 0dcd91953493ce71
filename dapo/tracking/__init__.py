"""Experiment tracking: per-step figures, the run spec and held-out evaluations sent to the
dashboards people compare runs in (verl's ``trainer.logger``: console, TensorBoard, W&B,
MLflow). The backends' packages are the optional ``tracking`` extra; nothing here imports
them until a backend is opened."""

from dapo.tracking.trackers import (
    BACKENDS,
    EVAL_PREFIX,
    EXTRA,
    Tracker,
    Trackers,
    TrackerUnavailable,
    TrackingRun,
    check_available,
    open_trackers,
)

__all__ = [
    "BACKENDS",
    "EVAL_PREFIX",
    "EXTRA",
    "Tracker",
    "TrackerUnavailable",
    "Trackers",
    "TrackingRun",
    "check_available",
    "open_trackers",
]
