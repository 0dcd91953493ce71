"""DAPO dynamic sampling: which scored groups may enter a training batch.

A group whose G samples all have the same value of the filter metric has zero
advantage for every sample (see ``dapo.algorithm.advantages``), so it adds no
gradient, only noise to the batch size. DAPO drops it and keeps sampling until
the batch quota is full; for ``acc`` this is the paper's ``0 < #correct < G``.

Attributes read from each sample (object attribute or mapping key):

- ``acc``: whether the extracted answer matched the ground truth (bool); the
  ``"acc"`` metric uses it as 1.0 / 0.0.
- ``score``: the final scalar reward of the sample, i.e. the verifier's +1 / -1
  plus the soft overlong penalty. The ``"score"`` and ``"reward"`` metrics both
  use it: our reward is a single per-sample value, so the two names (kept for
  verl compatibility: ``seq_final_reward`` / ``seq_reward``) coincide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from proto.vocab import FILTER_METRICS, FilterMetric


def keep_group(values: Sequence[float]) -> bool:
    """True iff the values are not all equal (the group carries a learning signal).

    A singleton group is therefore always dropped. Empty input or NaN is an error.
    """
    if len(values) == 0:
        raise ValueError("keep_group needs at least one value")
    floats = [float(v) for v in values]
    if any(math.isnan(v) for v in floats):
        raise ValueError(f"keep_group got a NaN metric value: {floats}")
    first = floats[0]
    return any(v != first for v in floats[1:])


def _read(sample: Any, name: str) -> Any:
    if isinstance(sample, Mapping):
        if name not in sample:
            raise KeyError(f"sample has no key {name!r} (keys: {sorted(sample)})")
        return sample[name]
    if not hasattr(sample, name):
        raise AttributeError(f"sample of type {type(sample).__name__} has no attribute {name!r}")
    return getattr(sample, name)


def group_metric(samples: Sequence[Any], metric: FilterMetric) -> list[float]:
    """Per-sample values of ``metric`` for one group: ``acc`` as 1.0/0.0, else ``score``."""
    if metric == "acc":
        return [1.0 if bool(_read(s, "acc")) else 0.0 for s in samples]
    if metric in ("score", "reward"):
        return [float(_read(s, "score")) for s in samples]
    raise ValueError(
        f"algorithm.filter_groups.metric must be one of {FILTER_METRICS}, got {metric!r}"
    )
