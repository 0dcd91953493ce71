"""Sizing a run before it starts (``dapo plan``): memory per learner GPU and node, per
rollout GPU, Redis's memory and append-only file, and the weight bytes of each update,
from the run spec, the model's ``config.json`` and the cluster's shape. Pure functions,
one per formula, each deriving itself in its docstring."""

from dapo.sizing.plan import Workload, chart_values, make_plan
from dapo.sizing.shapes import ClusterShape, ModelShape, load_model_shape, model_shape_from_config

__all__ = [
    "ClusterShape",
    "ModelShape",
    "Workload",
    "chart_values",
    "load_model_shape",
    "make_plan",
    "model_shape_from_config",
]
