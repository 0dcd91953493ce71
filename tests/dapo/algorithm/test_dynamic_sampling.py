"""The dynamic-sampling predicate: keep a group iff its metric values are not all equal."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dapo.algorithm.dynamic_sampling import group_metric, keep_group


@dataclass
class Sample:
    acc: bool
    score: float


@pytest.mark.parametrize(
    ("values", "keep"),
    [
        ([1.0] * 16, False),  # all correct: #correct == G
        ([0.0] * 16, False),  # all wrong: #correct == 0
        ([1.0] + [0.0] * 15, True),  # 0 < #correct < G
        ([0.0] * 15 + [1.0], True),
        ([-1.0, -1.0], False),
        ([-1.0, -0.75], True),  # same acc, different overlong penalty: differs by score
        ([0.5], False),  # a singleton group has nothing to compare
    ],
)
def test_keep_group(values: list[float], keep: bool) -> None:
    assert keep_group(values) is keep


def test_keep_group_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="at least one"):
        keep_group([])
    with pytest.raises(ValueError, match="NaN"):
        keep_group([1.0, float("nan")])


def test_group_metric_reads_acc_and_score() -> None:
    group = [Sample(True, 1.0), Sample(False, -1.0), Sample(False, -1.5)]
    assert group_metric(group, "acc") == [1.0, 0.0, 0.0]
    assert group_metric(group, "score") == [1.0, -1.0, -1.5]
    assert group_metric(group, "reward") == group_metric(group, "score")
    as_dicts = [{"acc": s.acc, "score": s.score} for s in group]
    assert group_metric(as_dicts, "acc") == [1.0, 0.0, 0.0]


def test_metric_choice_changes_the_decision() -> None:
    # all wrong, one of them penalised for length: dropped by acc, kept by score
    group = [Sample(False, -1.0), Sample(False, -1.0), Sample(False, -1.25)]
    assert not keep_group(group_metric(group, "acc"))
    assert keep_group(group_metric(group, "score"))


def test_missing_attribute_and_bad_metric_are_named() -> None:
    with pytest.raises(AttributeError, match="'score'"):
        group_metric([object()], "score")
    with pytest.raises(KeyError, match="'acc'"):
        group_metric([{"score": 1.0}], "acc")
    with pytest.raises(ValueError, match="metric"):
        group_metric([Sample(True, 1.0)], "seq_reward")  # type: ignore[arg-type]
