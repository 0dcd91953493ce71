"""Batch assembly: staleness, dynamic-sampling outcomes, exact quota with carried surplus."""

from __future__ import annotations

import pytest

from proto.messages import ScoredGroup
from proto.runspec import AlgorithmConfig
from services.sampler.batcher import (
    BatchAssembler,
    check_gen_budget,
    classify,
    training_version,
    useful_prompts,
)
from tests.factories import scored_group


def group(accs: list[bool], version: int = 0, gid: str = "g") -> ScoredGroup:
    return scored_group("r", gid, accs, version)


def test_training_version_counts_the_batches_ahead_of_the_learner():
    assert training_version(5, learner_step=5, learner_version=5) == 5  # next to train
    assert training_version(6, learner_step=5, learner_version=5) == 6
    # a skipped step left the version behind the step count: later batches follow suit
    assert training_version(6, learner_step=5, learner_version=4) == 5
    assert training_version(3, learner_step=5, learner_version=5) == 5  # already trained


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
        asm.offer(group([True, False], gid=f"g{i}"), i, 0)
    assert asm.ready()
    first = asm.take()
    assert [h for _, h in first] == [0, 1, 2]
    assert not asm.ready() and [h for _, h in asm.held] == [3, 4]
    asm.offer(group([False, True], gid="g5"), 5, 0)
    assert [h for _, h in asm.take()] == [3, 4, 5]
    with pytest.raises(RuntimeError, match="only 0 of 3"):
        asm.take()


def test_held_groups_expire_for_a_later_batch():
    asm = BatchAssembler(4, AlgorithmConfig(max_staleness=1))
    asm.offer(group([True, False], version=0), "old", 1)
    asm.offer(group([True, False], version=1), "new", 1)
    stale = asm.expire_stale(2)  # the next batch trains at version 2
    assert [h for _, h in stale] == ["old"] and [h for _, h in asm.held] == ["new"]


def test_on_policy_keeps_only_the_training_version():
    asm = BatchAssembler(1, AlgorithmConfig(max_staleness=0))
    assert asm.offer(group([True, False], version=0), 0, 1) == "dropped_stale"
    assert asm.offer(group([True, False], version=1), 1, 1) == "kept"


def room(**kw):
    base = dict(published=3, train_version=3, max_staleness=0, train_batch_size=8, held=0,
                in_flight=0, keep_rate=1.0, limit=64)  # fmt: skip
    return useful_prompts(**{**base, **kw})


def test_dispatch_waits_for_weights_fresh_enough_for_the_next_batch():
    assert room() == 8  # on-policy, the learner published the version of the next batch
    assert room(train_version=4) == 0  # it is training batch 3: nothing dispatched now fits
    assert room(train_version=4, max_staleness=1) == 8  # one version behind is allowed
    assert room(max_staleness=1) == 16  # this batch and the next can use them
    assert room(held=3, in_flight=2) == 3
    assert room(keep_rate=0.5) == 16  # dynamic sampling keeps half
    assert room(keep_rate=0.5, limit=10, in_flight=4) == 6


def test_generation_budget_counts_scored_rounds():
    check_gen_budget(29, 10, 3)  # 2 whole rounds scored
    with pytest.raises(RuntimeError, match="after 3 generation rounds"):
        check_gen_budget(30, 10, 3)
    check_gen_budget(9, 10, 1)  # prompts in flight are not a spent round
    check_gen_budget(10_000, 10, 0)  # 0 = unlimited
