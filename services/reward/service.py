"""The reward loop: rollout groups in, scored groups out.

Each read of up to ``batch`` groups is decoded, verified and published as one
atomic commit per group (dedupe key = group id, so a redelivered group is
never scored into the stream twice). With ``workers`` > 0 the groups of a read
are verified in parallel in a process pool (the verifier is pure CPU work);
otherwise in this process. While a read is scored its entries are kept alive
(``Bus.touch``), so a slow group (hostile outputs that run every sample to its
timeout) is never taken over and scored again by another worker. A group whose
decoding or scoring fails is dead-lettered alone; the others of the read go on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from dapo.reward.verify import Verdict
from dapo.runtime.service import ServiceContext
from dapo.transport.bus import Delivery, handle_each, keep_alive
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
    touch_every_s: float = 5.0
    """How often the entries being scored are kept alive (well under the bus's reclaim idle
    time, 30 s by default)."""
    metrics: RewardMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RewardMetrics(self.rt.registry)

    def _job(self, group: RolloutGroup) -> tuple:
        """What ``verify_texts`` needs for one group: its decoded responses and the rule."""
        cfg = self.rt.spec.reward
        texts = self.tokenizer.batch_decode(
            [s.response_ids.tolist() for s in group.samples], skip_special_tokens=True
        )
        return (texts, group.ground_truth, cfg.mode, cfg.timeout_s)

    def _score(self, got: list[Delivery[RolloutGroup]]) -> list[tuple[Delivery, list[Verdict]]]:
        """Verdicts of every group that can be scored; a group that cannot is rejected."""
        jobs: dict[str, tuple | Future] = {}

        def prepare(d: Delivery[RolloutGroup]) -> None:
            job = self._job(d.message)
            jobs[d.entry_id] = job if self.pool is None else self.pool.submit(verify_texts, *job)

        verdicts: list[tuple[Delivery, list[Verdict]]] = []

        def finish(d: Delivery[RolloutGroup]) -> None:
            job = jobs[d.entry_id]
            v = job.result() if isinstance(job, Future) else verify_texts(*job)
            if len(v) != len(d.message.samples):
                raise ValueError(f"{len(v)} verdicts for {len(d.message.samples)} samples")
            verdicts.append((d, v))

        handle_each(self.rt.bus, got, prepare, fatal=(BrokenProcessPool,))
        prepared = [d for d in got if d.entry_id in jobs]
        handle_each(self.rt.bus, prepared, finish, fatal=(BrokenProcessPool,))
        return verdicts

    def step(self) -> int:
        """Score one read of rollout groups; returns how many were published."""
        got = self.rt.bus.consume(
            "rollouts", "reward", self.rt.worker_id, count=self.batch, block_ms=500
        )
        if not got:
            return 0
        t0 = time.perf_counter()
        with keep_alive(self.rt.bus, got, self.touch_every_s):
            verdicts = self._score(got)
        if not verdicts:
            return 0
        share = (time.perf_counter() - t0) / len(verdicts)
        spec = self.rt.spec
        done, scored = [], []
        for d, v in verdicts:
            try:
                scored.append(
                    score_group(d.message, v, spec.reward, spec.data.max_response_length, share)
                )
                done.append(d)
            except ValueError as exc:  # pydantic's ValidationError too: a hostile group
                self.rt.bus.reject(d, f"{type(exc).__name__}: {exc}")
        self.rt.bus.publish_many("scored", scored, [g.group_id for g in scored], done)
        self.rt.progress()
        for s in scored:
            self.metrics.observe(s)
        return len(scored)

    def serve(self) -> None:
        while not self.rt.should_stop():
            self.step()
