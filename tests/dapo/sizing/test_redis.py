"""Redis formulas: entry sizes from real encoded messages, allocator classes, entry counts."""

from __future__ import annotations

import pytest

from dapo.sizing import redis as sz
from dapo.transport.bus import BusSettings
from proto.codec import encode
from proto.messages import TrainingBatch, TrainingBatchRef
from proto.runspec import RunSpec


def spec(**trainer) -> RunSpec:
    return RunSpec.model_validate(
        {
            "data": {"train_batch_size": 8, "max_prompt_length": 64, "max_response_length": 256},
            "rollout": {"n": 4},
            "actor": {"ppo_mini_batch_size": 8},
            "reward": {"overlong_buffer": {"len": 16}},
            "trainer": {"total_training_steps": 1000, "save_freq": 20, **trainer},
        }
    )


def test_a_response_token_costs_its_id_and_log_prob():
    s = spec()
    for scored in (False, True):
        grow = sz.group_bytes(s, 64, 356, scored) - sz.group_bytes(s, 64, 256, scored)
        # 4 + 4 bytes in the blob; the header's array offsets may gain a digit
        assert 0 <= grow - s.rollout.n * 100 * (4 + 4) <= 4 * 4 * s.rollout.n
    grow = sz.prompt_task_bytes(s, 164) - sz.prompt_task_bytes(s, 64)
    assert 0 <= grow - 100 * (4 + sz.CHARS_PER_TOKEN) <= 2  # "64" -> "164": a digit


def test_batch_size_is_that_of_a_real_batch():
    s = spec()
    groups = [sz.group_message(s, 64, 256, scored=True, gid=f"g{i}") for i in range(8)]
    real = sum(
        len(k) + len(v)
        for k, v in encode(TrainingBatch(run_id="r" * 24, batch_id=0, groups=groups)).items()
    )
    # the header's array offsets gain digits as the blob grows, nothing else differs
    assert abs(sz.batch_bytes(s, 64, 256) - real) <= real / 1000


@pytest.mark.parametrize(
    ("size", "taken"), [(100, 100), (4096, 4096), (5000, 5120), (8193, 10240), (3 << 20, 3 << 20)]
)
def test_allocation_follows_jemalloc_size_classes(size, taken):
    assert sz.allocation_bytes(size) == taken


def test_small_entries_share_nodes_and_a_stream_has_one_at_least():
    # 10 references of 443 bytes fill two 4 KiB nodes, each passed by one entry
    assert sz.stream_bytes({"b": 10}, {"b": 443}) == {"b": 2 * sz.allocation_bytes(4096 + 443)}
    assert sz.stream_bytes({"b": 1}, {"b": 40}) == {"b": sz.allocation_bytes(4096 + 40)}
    assert sz.stream_bytes({"s": 3}, {"s": 5000}) == {"s": 3 * sz.allocation_bytes(5000)}


def test_allocation_wastes_at_most_a_quarter():
    for size in range(4097, 1 << 22, 7919):
        assert size <= sz.allocation_bytes(size) <= 1.25 * size


def test_entry_counts_follow_the_data_path():
    s = spec()
    got = sz.stream_entries(s, keep_rate=0.5, rollout_workers=3, reward_replicas=2)
    in_flight = 2 * 8  # max_in_flight 0: twice train_batch_size
    assert got == {
        "prompts": in_flight + sz.TRIM_EVERY,
        "rollouts": in_flight + 3 * sz.TRIM_EVERY,
        # the groups of 20 trained batches (save_freq), 2 ahead (max_staleness 1 + 1) and
        # the one being filled, at keep rate 0.5; then two reward replicas' trim lag
        "scored": (20 + 2 + 1) * 8 * 2 + 2 * sz.TRIM_EVERY,
        "batches": 20 + 2 + sz.TRIM_EVERY,  # save_freq, max_staleness 1 + 1, trim lag
    }


def test_a_batch_entry_is_a_small_reference_whatever_the_responses():
    s = spec()
    groups = [f"{'r' * 24}-{10_000_000 + i}" for i in range(8)]
    real = TrainingBatchRef(run_id="r" * 24, batch_id=1000, group_ids=groups,
                            entry_ids=[f"{1764000000123 + i}-{i}" for i in range(8)])  # fmt: skip
    size = sum(len(k) + len(v) for k, v in encode(real).items())
    assert abs(sz.batch_ref_bytes(s) - size) <= 16  # the stamp's digits may differ
    assert sz.entry_sizes(s, 64, 20_480)["batches"] == sz.entry_sizes(s, 64, 16)["batches"]
    # a few dozen bytes per group, against the megabytes of the groups themselves
    assert sz.batch_ref_bytes(s) < 200 * 8 < sz.batch_bytes(s, 64, 256) / 10


def test_a_run_without_checkpoints_keeps_every_batch_and_short_runs_are_capped():
    assert sz.stream_entries(spec(save_freq=0), 1.0, 1, 1)["batches"] == 1000
    short = sz.stream_entries(spec(total_training_steps=3), 1.0, 1, 1)
    assert short["batches"] == 3
    assert short["rollouts"] == 3 * 8 + 16  # every group the run makes, and those in flight


def test_constants_are_the_codes():
    from dapo.sizing import learner
    from services.learner import logprobs, model_init

    assert sz.TRIM_EVERY == BusSettings().trim_every
    assert sz.MAX_ENTRY_BYTES == BusSettings().max_entry_bytes
    assert learner.LOGPROB_CHUNK == logprobs.CHUNK
    assert learner.LOAD_BATCH_BYTES == model_init.LOAD_BATCH_BYTES


def test_aof_and_limit():
    assert sz.aof_volume_bytes(1) == 3 * sz.AOF_REWRITE_MIN_BYTES
    assert sz.aof_volume_bytes(1 << 30) == 3 << 30
    assert sz.memory_limit_bytes(1 << 30, 5) == (2 << 30) + 5
