"""Small messages and specs the tests build over and over, made in one place."""

from __future__ import annotations

import numpy as np

from proto.messages import (
    PromptTask,
    RolloutGroup,
    Sample,
    SamplingParams,
    ScoredGroup,
    ScoredSample,
    TrainingBatch,
    WeightVersion,
)


def prompt_task(run_id: str, i: int, n: int = 4, max_new_tokens: int = 8) -> PromptTask:
    """The i-th prompt "i+1=" with answer i+1 (token ids are made up, 1-3 long)."""
    return PromptTask(
        run_id=run_id,
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        prompt_text=f"{i}+1=",
        prompt_ids=np.arange(1, 5 + i % 3, dtype=np.int32),
        ground_truth=str(i + 1),
        sampling=SamplingParams(n=n, max_new_tokens=max_new_tokens),
    )


def weight_version(run_id: str, v: int) -> WeightVersion:
    return WeightVersion(run_id=run_id, version=v, step=v, checksum=f"c{v}", num_bytes=0)


def scored_sample(acc: bool, response: tuple[int, ...] = (65, 256), version: int = 0):
    return ScoredSample(
        response_ids=list(response),
        logprobs=[-0.5] * len(response),
        finish_reason="stop",
        versions=[version],
        version_starts=[0],
        score=1.0 if acc else -1.0,
        acc=acc,
        overlong_penalty=0.0,
        length=len(response),
        truncated=False,
    )


def scored_group(
    run_id: str, gid: str, accs: list[bool], version: int = 0, prompt: tuple[int, ...] = (49, 43)
) -> ScoredGroup:
    """A group of ``len(accs)`` two-token answers, correct where ``accs`` says so."""
    return ScoredGroup(
        run_id=run_id,
        group_id=gid,
        prompt_id=f"p-{gid}",
        prompt_ids=np.array(prompt),
        ground_truth="2",
        n=len(accs),
        policy_version=version,
        worker_id="w",
        engine="hf",
        gen_seconds=0.0,
        samples=[scored_sample(a, version=version) for a in accs],
    )


def rollout_group(run_id: str, gid: str, responses: list[list[int]], version: int = 0):
    return RolloutGroup(
        run_id=run_id,
        group_id=gid,
        prompt_id=f"p-{gid}",
        prompt_ids=np.array([49, 43]),
        ground_truth="2",
        n=len(responses),
        policy_version=version,
        worker_id="w",
        engine="hf",
        gen_seconds=0.0,
        samples=[
            Sample(
                response_ids=r,
                logprobs=[-0.5] * len(r),
                finish_reason="stop",
                versions=[version],
                version_starts=[0],
            )
            for r in responses
        ],
    )


def training_batch(run_id: str, batch_id: int, groups: list[ScoredGroup]) -> TrainingBatch:
    return TrainingBatch(run_id=run_id, batch_id=batch_id, groups=groups)
