"""Every closed vocabulary of the system, defined once.

The run spec, the messages, the services and the libraries all take their
literal types from here, so a new mode is added in one place and every
validator learns it at once.
"""

from __future__ import annotations

from typing import Literal, get_args

LossAggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
"""How per-token losses become one scalar (verl's ``actor.loss_agg_mode``)."""
RewardMode = Literal["dapo", "boxed", "math_verify"]
"""Verifier: official DAPO-compatible, strict ``\\boxed{}``, or symbolic Math-Verify."""
EngineName = Literal["hf", "vllm"]
"""Inference engine of the rollout service."""
FilterMetric = Literal["acc", "score", "reward"]
"""Per-sample value dynamic sampling compares within a group."""
FinishReason = Literal["stop", "length"]
"""Why a sample ended: EOS emitted, or the token budget ran out."""
ISLevel = Literal["token", "sequence"]
"""Importance-weight level of ``algorithm.rollout_correction.rollout_is``."""
RSLevel = Literal["token", "sequence", "geometric"]
"""Rejection level of ``algorithm.rollout_correction.rollout_rs``."""
KLType = Literal["k1", "k3"]
"""KL estimator of the optional KL loss."""
ModelDType = Literal["float32", "bfloat16", "float16"]
"""Parameter dtypes a run may use."""
PromptTemplate = Literal["none", "dapo"]
"""Prompt wrapping: none, or the DAPO math template."""

LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
REWARD_MODES: tuple[str, ...] = get_args(RewardMode)
FILTER_METRICS: tuple[str, ...] = get_args(FilterMetric)

RUN_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
"""A run id: 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter, digit or
'_' (it names the run's folder, so never '.', '..' or an option-like '-x')."""
