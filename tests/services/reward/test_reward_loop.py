"""The reward loop on the in-memory bus: verdicts, overlong shaping, exactly one scored
group per rollout group, parallel verification in a process pool."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from proto.runspec import RunSpec
from services.reward.service import RewardWorker
from tests.factories import rollout_group

SPEC = RunSpec.model_validate(
    {
        "data": {"train_batch_size": 2, "max_response_length": 12},
        "actor": {"ppo_mini_batch_size": 2},
        "rollout": {"n": 2},
        "reward": {"overlong_buffer": {"enable": True, "len": 4, "penalty_factor": 1.0}},
    }
)
EOS = 256


def ids(text: str, eos: bool = True) -> list[int]:
    return list(text.encode()) + ([EOS] if eos else [])


def test_groups_are_scored_with_the_overlong_penalty(memory_context, byte_tokenizer):
    ctx = memory_context(SPEC, "reward")
    right, wrong = ids("Answer: 2"), ids("Answer: 3")  # 10 tokens: 2 into the 4-token buffer
    ctx.bus.publish("rollouts", rollout_group(ctx.run_id, "a", [right, wrong]))
    ctx.bus.publish("rollouts", rollout_group(ctx.run_id, "b", [ids("2"), ids("Answer: 2")]))
    assert RewardWorker(ctx, byte_tokenizer).step() == 2
    out = {m.group_id: m for m in _scored(ctx)}
    a = out["a"].samples
    assert [s.acc for s in a] == [True, False]
    assert [s.score for s in a] == [1.0 - 0.5, -1.0 - 0.5]  # (10 - 8) / 4 of the penalty
    assert [s.acc for s in out["b"].samples] == [False, True]
    assert ctx.bus.lag("rollouts")["reward"].pending == 0


def test_a_redelivered_group_is_not_scored_twice(memory_context, byte_tokenizer):
    ctx = memory_context(SPEC, "reward")
    group = rollout_group(ctx.run_id, "a", [ids("Answer: 2"), ids("Answer: 1")])
    ctx.bus.publish("rollouts", group)
    ctx.bus.publish("rollouts", group)  # the rollout side published it twice
    RewardWorker(ctx, byte_tokenizer).step()
    assert [m.group_id for m in _scored(ctx)] == ["a"]


def test_a_pool_scores_the_groups_of_a_read_in_parallel(memory_context, byte_tokenizer):
    ctx = memory_context(SPEC, "reward")
    for i in range(6):
        answer = ids(f"Answer: {2 + i % 2}")
        ctx.bus.publish("rollouts", rollout_group(ctx.run_id, f"g{i}", [answer, ids("x")]))
    with ProcessPoolExecutor(2) as pool:
        assert RewardWorker(ctx, byte_tokenizer, batch=6, pool=pool).step() == 6
    got = {m.group_id: m.samples[0].acc for m in _scored(ctx)}
    assert got == {f"g{i}": i % 2 == 0 for i in range(6)}


def _scored(ctx):
    return ctx.bus.read("scored")[1]
