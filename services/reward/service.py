"""The reward loop: rollout groups in, scored groups out.

Each read of up to ``batch`` groups is decoded, verified and published as one
atomic commit per group (dedupe key = group id, so a redelivered group is
never scored into the stream twice). With ``workers`` > 0 the groups of a read
are verified in parallel in a process pool (the verifier is pure CPU work);
otherwise in this process.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from dapo.reward.verify import Verdict
from dapo.runtime.service import ServiceContext
from proto.messages import RolloutGroup, ScoredGroup
from services.reward.scoring import score_group, verify_texts

log = logging.getLogger(__name__)


class RewardMetrics:
    def __init__(self, registry) -> None:
        self.samples = Counter("dapo_reward_samples", "Samples scored", ["acc"], registry=registry)
        self.reward = Histogram(
            "dapo_reward_score",
            "Per-sample score incl. overlong penalty",
            buckets=(-2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5),
            registry=registry,
        )
        self.seconds = Histogram(
            "dapo_reward_group_seconds", "Scoring time per group", registry=registry
        )
        self.overlong = Counter(
            "dapo_reward_truncated_samples", "Samples cut at the length limit", registry=registry
        )

    def observe(self, scored: ScoredGroup) -> None:
        self.seconds.observe(scored.reward_seconds)
        for s in scored.samples:
            self.samples.labels(str(s.acc).lower()).inc()
            self.reward.observe(s.score)
            if s.truncated:
                self.overlong.inc()


@dataclass
class RewardWorker:
    rt: ServiceContext
    tokenizer: object
    """Anything with ``batch_decode(ids, skip_special_tokens=True)`` (a HF tokenizer)."""
    batch: int = 32
    pool: Executor | None = None
    metrics: RewardMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RewardMetrics(self.rt.registry)

    def _verdicts(self, groups: list[RolloutGroup]) -> list[list[Verdict]]:
        cfg = self.rt.spec.reward
        jobs = []
        for g in groups:
            texts = self.tokenizer.batch_decode(
                [s.response_ids.tolist() for s in g.samples], skip_special_tokens=True
            )
            jobs.append((texts, g.ground_truth, cfg.mode, cfg.timeout_s))
        if self.pool is None:
            return [verify_texts(*job) for job in jobs]
        futures = [self.pool.submit(verify_texts, *job) for job in jobs]  # all at once
        return [f.result() for f in futures]

    def step(self) -> int:
        """Score one read of rollout groups; returns how many were published."""
        got = self.rt.bus.consume(
            "rollouts", "reward", self.rt.worker_id, count=self.batch, block_ms=500
        )
        if not got:
            return 0
        t0 = time.perf_counter()
        verdicts = self._verdicts([d.message for d in got])
        share = (time.perf_counter() - t0) / len(got)
        spec = self.rt.spec
        scored = [
            score_group(d.message, v, spec.reward, spec.data.max_response_length, share)
            for d, v in zip(got, verdicts, strict=True)
        ]
        self.rt.bus.publish_many("scored", scored, [g.group_id for g in scored], got)
        self.rt.progress()
        for s in scored:
            self.metrics.observe(s)
        return len(scored)

    def serve(self) -> None:
        while not self.rt.should_stop():
            self.step()
