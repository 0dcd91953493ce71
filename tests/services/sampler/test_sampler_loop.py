"""The sampler loop on the in-memory bus: dispatch bound, filtering, staleness, exact
batches, the account, a restart, and a run that cannot fill a batch."""

from __future__ import annotations

import pytest

from dapo.data.dataset import load_dataset
from dapo.data.prompts import PromptSource
from proto.messages import PromptTask
from proto.runspec import RunSpec
from services.sampler.service import Sampler, SamplerMetrics
from tests.e2e_helpers import make_dataset
from tests.factories import scored_group, weight_version


def spec_of(**algorithm) -> RunSpec:
    return RunSpec.model_validate(
        {
            "data": {"train_batch_size": 2, "max_prompt_length": 32, "max_response_length": 8},
            "rollout": {"n": 4},
            "actor": {"ppo_mini_batch_size": 2},
            "algorithm": {"max_staleness": 1, **algorithm},
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


def dispatched(ctx) -> list[PromptTask]:
    return ctx.bus.read("prompts")[1]


def identity_holds(sampler: Sampler) -> None:
    acc = sampler.account()
    resolved = acc["trained"] + acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    assert acc["dispatched"] == resolved + acc["dropped_stale"] + acc["in_flight"]


def test_dispatch_filter_stale_and_exact_batches(memory_context, source_for):
    spec = spec_of()
    ctx = memory_context(spec, "sampler")
    sampler = new_sampler(ctx, source_for(spec))
    sampler.step()
    assert sampler.account()["dispatched"] == 4 == len(dispatched(ctx))  # max_in_flight
    for v in (1, 2):
        ctx.bus.publish("versions", weight_version(ctx.run_id, v))
    g = [t.group_id for t in dispatched(ctx)]
    ctx.bus.publish("scored", scored_group(ctx.run_id, g[0], [True, False, True, False], 0))
    ctx.bus.publish("scored", scored_group(ctx.run_id, g[1], [True] * 4, 2))
    ctx.bus.publish("scored", scored_group(ctx.run_id, g[2], [False] * 4, 2))
    ctx.bus.publish("scored", scored_group(ctx.run_id, g[3], [True, False, False, False], 1))
    sampler.step()
    acc = sampler.account()
    assert (acc["dropped_stale"], acc["filtered_all_correct"], acc["filtered_all_wrong"]) == (
        1,
        1,
        1,
    )
    assert acc["batches"] == 0 and len(sampler._assembler.held) == 1
    identity_holds(sampler)
    sampler.step()  # three resolved: room for three more prompts
    more = [t.group_id for t in dispatched(ctx)][4:]
    assert len(more) == 3
    ctx.bus.publish("scored", scored_group(ctx.run_id, more[0], [False, True, False, True], 2))
    sampler.step()
    (batch,) = ctx.bus.read("batches")[1]
    assert [gr.group_id for gr in batch.groups] == [g[3], more[0]]  # oldest kept first
    assert batch.batch_id == 0 and sampler.account()["trained"] == 2
    identity_holds(sampler)


def test_a_restarted_sampler_resumes_its_cursor_and_held_groups(memory_context, source_for):
    spec = spec_of()
    ctx = memory_context(spec, "sampler")
    first = new_sampler(ctx, source_for(spec))
    first.step()
    g = [t.group_id for t in dispatched(ctx)]
    ctx.bus.publish("scored", scored_group(ctx.run_id, g[0], [True, False, False, False]))
    first.step()
    assert len(first._assembler.held) == 1
    again = memory_context(spec, "sampler")  # same worker id, same broker: a new process
    restarted = new_sampler(again, source_for(spec))
    restarted.step()
    assert len(restarted._assembler.held) == 1  # handed back, not counted twice
    assert restarted.account()["filtered_all_wrong"] == 0
    ids = [t.group_id for t in dispatched(ctx)]
    assert len(ids) == len(set(ids)) == restarted.account()["dispatched"]  # no repeats


def test_a_run_that_cannot_fill_a_batch_fails_with_the_reason(memory_context, source_for):
    spec = spec_of(filter_groups={"max_num_gen_batches": 2})
    ctx = memory_context(spec, "sampler")
    sampler = new_sampler(ctx, source_for(spec))
    answered: set[str] = set()
    with pytest.raises(RuntimeError, match="could not fill a batch"):
        for _ in range(20):
            sampler.tick()
            for task in dispatched(ctx):  # every group all wrong: nothing to learn from
                if task.group_id not in answered:
                    answered.add(task.group_id)
                    ctx.bus.publish("scored", scored_group(ctx.run_id, task.group_id, [False] * 4))
    state = ctx.store.state(ctx.run_id)
    assert state.status == "failed" and "max_num_gen_batches" in state.error
    assert sampler.account()["batches"] == 0
