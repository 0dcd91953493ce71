"""The sampler loop on the in-memory bus: dispatch that waits for fresh enough weights,
staleness judged at the training version, filtering, exact batches, the account, a
restart, and the dynamic-sampling budget charged on scored rounds only."""

from __future__ import annotations

import pytest

from dapo.data.dataset import load_dataset
from dapo.data.prompts import PromptSource
from proto.messages import PromptTask
from proto.runspec import RunSpec
from services.sampler.service import Sampler, SamplerMetrics
from tests.e2e_helpers import make_dataset
from tests.factories import scored_group, weight_version


def spec_of(max_staleness: int = 1, **algorithm) -> RunSpec:
    correction = {"rollout_correction": {"rollout_is": "token"}} if max_staleness else {}
    return RunSpec.model_validate(
        {
            "data": {"train_batch_size": 2, "max_prompt_length": 32, "max_response_length": 8},
            "rollout": {"n": 4},
            "actor": {"ppo_mini_batch_size": 2},
            "algorithm": {"max_staleness": max_staleness, **correction, **algorithm},
            "reward": {"overlong_buffer": {"enable": False}},
            "trainer": {"total_training_steps": 3, "max_in_flight": 4},
        }
    )


@pytest.fixture
def source_for(tmp_path, byte_tokenizer):
    rows = load_dataset(make_dataset(tmp_path / "d.jsonl", n=5))
    return lambda spec: PromptSource(rows, byte_tokenizer, spec.data)


def new_sampler(ctx, source) -> Sampler:
    return Sampler(ctx, ctx.spec, source, SamplerMetrics(ctx.registry))


def dispatched(ctx) -> list[str]:
    return [t.group_id for t in ctx.bus.read("prompts")[1]]


def learner_trained(ctx, steps: int, publish: bool = True) -> None:
    """What the learner does after ``steps`` batches: its state, then (if the broadcast
    worked) the announcement that workers hold the new version."""
    ctx.store.update(ctx.run_id, step=steps, policy_version=steps)
    if publish:
        ctx.bus.publish("versions", weight_version(ctx.run_id, steps))


def score(ctx, gid: str, accs: list[bool], version: int) -> None:
    ctx.bus.publish("scored", scored_group(ctx.run_id, gid, accs, version))


def identity_holds(sampler: Sampler) -> None:
    acc = sampler.account()
    resolved = acc["trained"] + acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    assert acc["dispatched"] == resolved + acc["dropped_stale"] + acc["in_flight"]


def test_filtering_exact_batches_and_the_account(memory_context, source_for):
    spec = spec_of(max_staleness=1)
    ctx = memory_context(spec, "sampler")
    learner_trained(ctx, 0)  # the learner's first broadcast
    sampler = new_sampler(ctx, source_for(spec))
    sampler.step()
    g = dispatched(ctx)
    assert len(g) == 4  # this batch and the next may use version 0: bounded by max_in_flight
    score(ctx, g[0], [True, False, True, False], 0)
    score(ctx, g[1], [True] * 4, 0)
    score(ctx, g[2], [False] * 4, 0)
    score(ctx, g[3], [True, False, False, False], 0)
    sampler.step()
    acc = sampler.account()
    assert (acc["filtered_all_correct"], acc["filtered_all_wrong"], acc["batches"]) == (1, 1, 1)
    (batch,) = ctx.bus.read("batches")[1]
    assert batch.group_ids == [g[0], g[3]]
    held = ctx.bus.fetch("scored", batch.entry_ids)  # the groups stay on scored, held
    assert [gr.group_id for gr in held] == [g[0], g[3]]
    assert ctx.bus.lag("scored")["sampler"].pending == 2  # the two kept; the filtered acked
    assert batch.stats.mean_version_lag == 0.0 and acc["scored_since_batch"] == 0
    assert batch.stats.gen_rounds == 2  # four groups scored for a batch of two
    identity_holds(sampler)


def test_staleness_is_judged_at_the_version_that_trains_the_batch(memory_context, source_for):
    spec = spec_of(max_staleness=1)
    ctx = memory_context(spec, "sampler")
    learner_trained(ctx, 0)
    sampler = new_sampler(ctx, source_for(spec))
    sampler.step()
    g = dispatched(ctx)
    score(ctx, g[0], [True, False, False, False], 0)
    score(ctx, g[1], [False, True, False, False], 0)
    sampler.step()  # batch 0, trained by version 0
    learner_trained(ctx, 1)
    score(ctx, g[2], [True, False, False, False], 0)  # batch 1 trains at version 1: lag 1
    score(ctx, g[3], [True, False, False, False], 0)
    sampler.step()
    assert sampler.account()["batches"] == 2 and sampler.account()["dropped_stale"] == 0
    learner_trained(ctx, 2)  # batch 2 trains at version 2: a version-0 group is 2 behind
    more = dispatched(ctx)[4:]
    score(ctx, more[0], [True, False, False, False], 0)
    score(ctx, more[1], [True, False, False, False], 1)
    sampler.step()
    assert sampler.account()["dropped_stale"] == 1 and len(sampler._assembler.held) == 1
    identity_holds(sampler)


def test_on_policy_dispatches_only_for_weights_of_the_next_batch(memory_context, source_for):
    ctx = memory_context(spec_of(max_staleness=0), "sampler")
    learner_trained(ctx, 0)
    sampler = new_sampler(ctx, source_for(ctx.spec))
    sampler.step()
    first = dispatched(ctx)
    assert len(first) == 2  # exactly one batch: a surplus would be stale for the next
    for gid in first:
        score(ctx, gid, [True, False, False, False], 0)
    sampler.step()
    assert sampler.account()["batches"] == 1
    learner_trained(ctx, 1, publish=False)  # trained, the broadcast not yet through
    sampler.step()
    assert len(dispatched(ctx)) == 2  # version 1 trains batch 1: wait until workers hold it
    ctx.bus.publish("versions", weight_version(ctx.run_id, 1))
    sampler.step()
    second = dispatched(ctx)[2:]
    assert len(second) == 2
    score(ctx, second[0], [True, False, False, False], 0)  # a worker that missed version 1
    score(ctx, second[1], [True, False, False, False], 1)
    sampler.step()
    assert sampler.account()["dropped_stale"] == 1 and sampler.account()["batches"] == 1


def test_a_restarted_sampler_resumes_its_cursor_and_held_groups(memory_context, source_for):
    spec = spec_of()
    ctx = memory_context(spec, "sampler")
    learner_trained(ctx, 0)
    first = new_sampler(ctx, source_for(spec))
    first.step()
    score(ctx, dispatched(ctx)[0], [True, False, False, False], 0)
    first.step()
    assert len(first._assembler.held) == 1
    again = memory_context(spec, "sampler")  # same worker id, same broker: a new process
    restarted = new_sampler(again, source_for(spec))
    restarted.step()
    assert len(restarted._assembler.held) == 1  # handed back, not counted twice
    assert restarted.account()["scored_since_batch"] == 0  # kept groups count as held
    ids = dispatched(ctx)
    assert len(ids) == len(set(ids)) == restarted.account()["dispatched"]  # no repeats


def test_the_budget_counts_scored_rounds_not_prompts_in_flight(memory_context, source_for):
    spec = spec_of(filter_groups={"max_num_gen_batches": 1})
    ctx = memory_context(spec, "sampler")
    learner_trained(ctx, 0)
    sampler = new_sampler(ctx, source_for(spec))
    for _ in range(3):
        sampler.tick()  # four prompts out, none scored: nothing is spent yet
    assert sampler.account()["dispatched"] == 4
    g = dispatched(ctx)
    score(ctx, g[0], [False] * 4, 0)
    sampler.tick()  # half a round scored
    score(ctx, g[1], [True] * 4, 0)
    with pytest.raises(RuntimeError, match="could not fill a batch"):
        sampler.tick()  # one whole round scored and nothing kept: the budget of 1 is spent
    state = ctx.store.state(ctx.run_id)
    assert state.status == "failed" and "max_num_gen_batches" in state.error


def test_prompt_tasks_carry_the_runs_sampling(memory_context, source_for):
    ctx = memory_context(spec_of(), "sampler")
    learner_trained(ctx, 0)
    new_sampler(ctx, source_for(ctx.spec)).step()
    task: PromptTask = ctx.bus.read("prompts")[1][0]
    assert (task.sampling.n, task.sampling.max_new_tokens, task.dispatch_version) == (4, 8, 0)
