"""Round trip of every message type through the wire codec, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from proto.codec import DecodeError, UnknownSchemaVersion, decode, encode
from proto.messages import (
    BatchStats,
    PromptTask,
    RolloutGroup,
    Sample,
    SamplingParams,
    ScoredGroup,
    ScoredSample,
    TrainingBatch,
    WeightReport,
    WeightVersion,
)


def make_sample(rng, length: int, finish="stop") -> Sample:
    return Sample(
        response_ids=rng.integers(0, 150_000, length, dtype=np.int32),
        logprobs=-rng.random(length, dtype=np.float32),
        finish_reason=finish,
        versions=[3],
        version_starts=[0],
    )


def make_scored(rng, length: int, acc: bool) -> ScoredSample:
    s = make_sample(rng, length)
    return ScoredSample(
        **{
            k: getattr(s, k)
            for k in ("response_ids", "logprobs", "finish_reason", "versions", "version_starts")
        },
        score=1.0 if acc else -1.0,
        acc=acc,
        overlong_penalty=0.0,
        length=length,
        truncated=False,
        pred="42",
    )


def group_fields(rng, n: int) -> dict:
    return dict(
        run_id="r1",
        group_id="g-1",
        prompt_id="train:7",
        epoch=1,
        prompt_ids=rng.integers(0, 1000, 12, dtype=np.int32),
        ground_truth="42",
        data_source="math",
        n=n,
        policy_version=3,
        dispatch_version=2,
        worker_id="w0",
        engine="hf",
        gen_seconds=0.5,
    )


def make_prompt_task(rng) -> PromptTask:
    return PromptTask(
        run_id="r1",
        group_id="g-1",
        prompt_id="train:7",
        prompt_text="1+1=",
        prompt_ids=rng.integers(0, 1000, 9, dtype=np.int32),
        ground_truth="2",
        sampling=SamplingParams(n=4, max_new_tokens=16, top_p=0.9),
    )


def make_scored_group(rng, n=4) -> ScoredGroup:
    return ScoredGroup(
        **group_fields(rng, n), samples=[make_scored(rng, 5 + i, i % 2 == 0) for i in range(n)]
    )


def all_messages():
    rng = np.random.default_rng(0)
    return [
        make_prompt_task(rng),
        RolloutGroup(**group_fields(rng, 3), samples=[make_sample(rng, 4 + i) for i in range(3)]),
        make_scored_group(rng),
        TrainingBatch(
            run_id="r1",
            batch_id=5,
            groups=[make_scored_group(rng), make_scored_group(rng)],
            stats=BatchStats(gen_rounds=2, kept=2, filtered_all_correct=1),
        ),
        WeightVersion(run_id="r1", version=4, step=4, checksum="abc", num_bytes=1024),
        WeightReport(run_id="r1", worker_id="w0", version=4, checksum="abc"),
    ]


def assert_same(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: m.kind)
def test_round_trip_every_message(msg):
    fields = encode(msg)
    back = decode(fields, type(msg))
    assert type(back) is type(msg)
    assert_same(msg.model_dump(), back.model_dump())


def test_arrays_travel_as_packed_bytes_not_json():
    rng = np.random.default_rng(1)
    group = make_scored_group(rng)
    fields = encode(group)
    total_tokens = sum(s.length for s in group.samples) + group.prompt_ids.size
    # 4 bytes per token id, 4 per log-prob (prompt has ids only), 8 per version segment
    segments = sum(s.versions.size for s in group.samples)
    assert len(fields["b"]) == 4 * total_tokens + 4 * sum(s.length for s in group.samples) + (
        8 * segments
    )
    assert b"response_ids" in fields["h"] and b"@a" in fields["h"]


def test_unknown_schema_version_is_reported_clearly():
    fields = encode(all_messages()[0])
    fields["v"] = b"99"
    with pytest.raises(UnknownSchemaVersion, match="schema version 99 is not supported"):
        decode(fields, PromptTask)


def test_wrong_kind_and_garbage_raise_decode_error():
    fields = encode(all_messages()[0])
    with pytest.raises(DecodeError, match="expected a 'rollout_group'"):
        decode(fields, RolloutGroup)
    with pytest.raises(DecodeError, match="no 'h' field"):
        decode({b"v": b"1", b"k": b"prompt_task"}, PromptTask)
    bad = dict(fields, h=b"{not json")
    with pytest.raises(DecodeError):
        decode(bad, PromptTask)


def test_sample_lengths_must_agree():
    with pytest.raises(ValidationError, match="response_ids has 3 tokens but logprobs has 2"):
        Sample(
            response_ids=[1, 2, 3],
            logprobs=[-0.1, -0.2],
            finish_reason="stop",
            versions=[0],
            version_starts=[0],
        )


def test_group_size_and_g_at_least_two():
    rng = np.random.default_rng(2)
    with pytest.raises(ValidationError, match="expected n=3"):
        RolloutGroup(**group_fields(rng, 3), samples=[make_sample(rng, 4)])
    with pytest.raises(ValidationError, match="n"):
        RolloutGroup(**group_fields(rng, 1), samples=[make_sample(rng, 4)])


def test_scored_sample_consistency():
    rng = np.random.default_rng(3)
    s = make_sample(rng, 4, finish="length")
    base = dict(
        response_ids=s.response_ids,
        logprobs=s.logprobs,
        finish_reason="length",
        versions=[3],
        version_starts=[0],
        score=-1.0,
        acc=False,
        overlong_penalty=0.0,
    )
    with pytest.raises(ValidationError, match="length 5 != 4"):
        ScoredSample(**base, length=5, truncated=True)
    with pytest.raises(ValidationError, match="truncated must equal"):
        ScoredSample(**base, length=4, truncated=False)


def test_finish_reason_is_an_enumeration():
    with pytest.raises(ValidationError, match="finish_reason"):
        Sample(
            response_ids=[1], logprobs=[-0.1], finish_reason="eos", versions=[0], version_starts=[0]
        )


def test_json_dump_for_the_api_uses_lists():
    task = all_messages()[0]
    as_json = task.model_dump(mode="json")
    assert isinstance(as_json["prompt_ids"], list)


def test_versions_segment_the_response_and_expand_per_token():
    base = dict(response_ids=[5, 6, 7, 8, 9], logprobs=[-0.1] * 5, finish_reason="length")
    s = Sample(**base, versions=[3, 4, 6], version_starts=[0, 2, 4])
    assert s.token_versions().tolist() == [3, 3, 4, 4, 6] and s.oldest_version == 3
    for versions, starts, why in (
        ([3, 4], [1, 2], "start at 0"),
        ([3, 4], [0, 0], "increase"),
        ([3, 4], [0, 5], "stay below"),
        ([4, 3], [0, 2], "non-decreasing"),
        ([3], [0, 2], "equal length"),
    ):
        with pytest.raises(ValidationError, match=why):
            Sample(**base, versions=versions, version_starts=starts)


def test_a_groups_version_is_its_oldest_token():
    rng = np.random.default_rng(5)
    samples = [make_sample(rng, 4), make_sample(rng, 4)]
    RolloutGroup(**group_fields(rng, 2), samples=samples)  # both generated by version 3
    newer = samples[1].model_copy(update={"versions": np.array([4], dtype=np.int32)})
    with pytest.raises(ValidationError, match="not the oldest version"):
        RolloutGroup(**{**group_fields(rng, 2), "policy_version": 4}, samples=[samples[0], newer])
