"""Reward service: rollout groups in, scored groups out."""

from __future__ import annotations

import logging
from concurrent.futures import Executor, ProcessPoolExecutor

from prometheus_client import Counter, Histogram
from pydantic import Field

from dapo.data.models import load_tokenizer
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceContext, ServiceRuntime
from proto.messages import RolloutGroup
from services.reward.scoring import score_group, score_texts

log = logging.getLogger(__name__)


class RewardSettings(ServiceSettings):
    workers: int = Field(0, ge=0)
    """Verifier processes (DAPO_WORKERS); 0 = score in the service process."""
    batch: int = Field(32, ge=1)
    """Rollout groups read per poll."""


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


def _score_in(pool: Executor | None, texts, gt, mode, timeout_s):
    if pool is None:
        return score_texts(texts, gt, mode, timeout_s)
    return pool.submit(score_texts, texts, gt, mode, timeout_s).result()


def serve(rt: ServiceContext, tokenizer, settings: RewardSettings) -> None:
    spec, metrics = rt.spec, RewardMetrics(rt.registry)
    pool = ProcessPoolExecutor(settings.workers) if settings.workers > 0 else None
    try:
        while not rt.should_stop():
            got = rt.bus.consume(
                "rollouts", "reward", rt.worker_id, count=settings.batch, block_ms=500
            )
            for d in got:
                group: RolloutGroup = d.message
                texts = tokenizer.batch_decode(
                    [s.response_ids.tolist() for s in group.samples], skip_special_tokens=True
                )
                scored = score_group(
                    group,
                    texts,
                    spec.reward,
                    spec.data.max_response_length,
                    scorer=lambda t, gt, m, to: _score_in(pool, t, gt, m, to),
                )
                rt.bus.commit(stream="scored", msg=scored, dedupe_key=group.group_id, ack=[d])
                metrics.seconds.observe(scored.reward_seconds)
                for s in scored.samples:
                    metrics.samples.labels(str(s.acc).lower()).inc()
                    metrics.reward.observe(s.score)
                    if s.truncated:
                        metrics.overlong.inc()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def run(settings: RewardSettings) -> None:
    with ServiceRuntime("reward", settings) as rt:
        serve(rt.ctx, load_tokenizer(rt.ctx.spec.model, settings.cache_dir), settings)


def main() -> int:
    run(RewardSettings.from_env())
    return 0
