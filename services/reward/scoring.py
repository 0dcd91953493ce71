"""Turning a rollout group into a scored group: verifier verdicts + soft overlong punishment."""

from __future__ import annotations

from collections.abc import Sequence

from dapo.algorithm.overlong import overlong_penalty
from dapo.reward.verify import Verdict, verify
from proto.messages import RolloutGroup, ScoredGroup, ScoredSample
from proto.runspec import RewardConfig


def verify_texts(
    texts: Sequence[str], ground_truth: str, mode: str, timeout_s: float
) -> list[Verdict]:
    """The verifier's verdict on each decoded response of one group (picklable: it runs in
    the reward service's process pool when it has one)."""
    return [verify(t, ground_truth, mode=mode, timeout_s=timeout_s) for t in texts]


def score_group(
    group: RolloutGroup,
    verdicts: Sequence[Verdict],
    cfg: RewardConfig,
    max_response_length: int,
    seconds: float = 0.0,
) -> ScoredGroup:
    """``verdicts[i]`` judges ``group.samples[i]``; the score adds the soft overlong penalty
    (when ``cfg.overlong_buffer.enable``) to the verifier's +1 / -1."""
    ob = cfg.overlong_buffer
    samples = []
    for sample, verdict in zip(group.samples, verdicts, strict=True):
        length = int(sample.response_ids.size)  # EOS counted when emitted
        penalty = (
            overlong_penalty(length, max_response_length, ob.len, ob.penalty_factor)
            if ob.enable
            else 0.0
        )
        samples.append(
            ScoredSample(
                response_ids=sample.response_ids,
                logprobs=sample.logprobs,
                finish_reason=sample.finish_reason,
                versions=sample.versions,
                version_starts=sample.version_starts,
                score=verdict.score + penalty,
                acc=verdict.acc,
                overlong_penalty=min(penalty, 0.0),
                length=length,
                truncated=sample.finish_reason == "length",
                pred=verdict.pred[:200],
            )
        )
    fields = group.model_dump(exclude={"samples"})
    return ScoredGroup(**fields, samples=samples, reward_seconds=seconds)
