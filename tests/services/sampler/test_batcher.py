"""Batch assembly: staleness, dynamic-sampling outcomes, exact quota with carried surplus."""

from __future__ import annotations

import pytest

from proto.messages import ScoredGroup
from proto.runspec import AlgorithmConfig
from services.sampler.batcher import (
    BatchAssembler,
    check_gen_budget,
    classify,
    versions_newer_than,
)
from tests.factories import scored_group


def group(accs: list[bool], version: int = 0, gid: str = "g") -> ScoredGroup:
    return scored_group("r", gid, accs, version)


def test_versions_newer_than():
    assert versions_newer_than([0, 1, 2, 5], 1) == 2
    assert versions_newer_than([0], 0) == 0
    assert versions_newer_than([0, 3], 7) == 0  # a newer-than-known version is not stale


def test_classify_outcomes():
    cfg = AlgorithmConfig(max_staleness=1)
    assert classify(group([True, False]), 0, cfg) == "kept"
    assert classify(group([True, True]), 0, cfg) == "filtered_all_correct"
    assert classify(group([False, False]), 0, cfg) == "filtered_all_wrong"
    assert classify(group([True, False]), 2, cfg) == "dropped_stale"
    off = AlgorithmConfig.model_validate({"filter_groups": {"enable": False}})
    assert classify(group([True, True]), 0, off) == "kept"


def test_exact_quota_and_surplus_is_carried():
    asm = BatchAssembler(3, AlgorithmConfig())
    for i in range(5):
        asm.offer(group([True, False], gid=f"g{i}"), i, [0])
    assert asm.ready()
    first = asm.take()
    assert [h for _, h in first] == [0, 1, 2]
    assert not asm.ready() and [h for _, h in asm.held] == [3, 4]
    asm.offer(group([False, True], gid="g5"), 5, [0])
    assert [h for _, h in asm.take()] == [3, 4, 5]
    with pytest.raises(RuntimeError, match="only 0 of 3"):
        asm.take()


def test_held_groups_expire_when_they_go_stale():
    asm = BatchAssembler(4, AlgorithmConfig(max_staleness=1))
    asm.offer(group([True, False], version=0), "old", [0])
    asm.offer(group([True, False], version=1), "new", [0, 1])
    stale = asm.expire_stale([0, 1, 2])
    assert [h for _, h in stale] == ["old"] and [h for _, h in asm.held] == ["new"]


def test_on_policy_drops_anything_behind():
    asm = BatchAssembler(1, AlgorithmConfig(max_staleness=0))
    assert asm.offer(group([True, False], version=0), 0, [0, 1]) == "dropped_stale"
    assert asm.offer(group([True, False], version=1), 1, [0, 1]) == "kept"


def test_generation_budget_error_is_clear():
    check_gen_budget(30, 10, 3)  # 3 rounds: allowed
    with pytest.raises(RuntimeError, match="after 3 generation rounds"):
        check_gen_budget(31, 10, 3)
    check_gen_budget(10_000, 10, 0)  # 0 = unlimited
