"""The learner's loop: batches in, optimizer steps, weights out, checkpoints on disk.

Exactly-once training across crashes: a batch is acknowledged only once a
checkpoint containing its update is on disk. A restarted learner (same
consumer name) resumes from the newest checkpoint and is handed back every
batch it had not yet checkpointed; batches whose id is below the
checkpoint's step are acknowledged and skipped.

The loop sees the policy, the weight sender and the tokenizer only through the
protocols of ``services.learner.seams``, so it is the same on one rank or many
and runs in tests over ``MemoryBus`` with in-memory stand-ins.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from dapo.runtime.service import ServiceContext
from dapo.tracking import Trackers
from dapo.transport.bus import Delivery
from dapo.weights.registry import WeightSyncError
from proto.messages import TrainingBatch, WeightVersion
from proto.state import StepReport
from services.learner.checkpoint import prune_checkpoints
from services.learner.metrics import LearnerMetrics
from services.learner.seams import Tokenizer, TrainablePolicy, WeightBroadcaster

log = logging.getLogger(__name__)
CONSUMER = "learner-0"
RESEND_INTERVAL_S = 5.0
"""How often an idle learner checks that every live worker holds its version."""


@dataclass
class LearnerLoop:
    """One learner's loop (rank 0's when sharded). ``step`` counts the batches trained,
    which is also the id of the next batch to train; ``last_ckpt`` is the checkpoint the
    learner resumed from, if any; ``held`` the deliveries trained since the last one."""

    rt: ServiceContext
    policy: TrainablePolicy
    tokenizer: Tokenizer
    sender: WeightBroadcaster
    run_dir: Path
    step: int
    keep_checkpoints: int = 3
    metrics: LearnerMetrics = field(init=False)
    held: list[Delivery] = field(default_factory=list)
    last_ckpt: Path | None = None
    trackers: Trackers = field(default_factory=Trackers)
    """Dashboards (``trainer.logger``) that get each step's figures; none by default."""
    _ckpt_step: int = -1
    _last_broadcast: int | None = None
    _published: int | None = None
    _last_try: float = 0.0

    def __post_init__(self) -> None:
        self.metrics = LearnerMetrics(self.rt.registry)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_file = self.run_dir / "metrics.jsonl"
        if self.last_ckpt is not None:  # resumed: that checkpoint already holds this step
            self._ckpt_step = self.step

    def announce(self, checksum: str, num_bytes: int) -> None:
        """Tell everyone that rollout workers hold this version now (the sampler dispatches
        for the batches it may train by it)."""
        msg = WeightVersion(
            run_id=self.rt.run_id,
            version=self.policy.version,
            step=self.step,
            checksum=checksum,
            num_bytes=num_bytes,
            checkpoint_dir=str(self.last_ckpt) if self.last_ckpt else None,
        )
        self.rt.bus.publish("versions", msg)
        self._published = self.policy.version

    def record_progress(self) -> None:
        """Step and version in the run state: the sampler judges staleness by them."""
        self.rt.store.update(self.rt.run_id, step=self.step, policy_version=self.policy.version)

    def run(self) -> None:
        """Announce where a late worker starts, send the current weights so every worker
        starts in agreement, then train."""
        if self.last_ckpt is not None:
            self.sender.publish_checkpoint(self.policy.version, str(self.last_ckpt))
        self.record_progress()
        self.broadcast()
        self.serve()

    def broadcast(self) -> None:
        """Send the weights. A version is announced only once a broadcast has reached a worker:
        a failed one (a worker died mid-transfer) or one nobody joined is tried again while
        the learner waits for its next batch (``maybe_resend``)."""
        version = self.policy.version
        self._last_try = time.monotonic()
        try:
            stats = self.sender.broadcast(version, self.policy.gather_weights())
        except WeightSyncError as exc:
            log.warning("weight broadcast of version %d failed: %s (sent again)", version, exc)
            self.metrics.sync_failures.inc()
            return
        self.metrics.observe_sync(stats)
        if stats.members and self._published != version:
            self.announce(stats.checksum, stats.bytes)
        self.check_workers()

    def maybe_resend(self) -> None:
        """While no batch arrives: send the current version again if the last broadcast did
        not reach every live worker. Without it, a strictly on-policy run whose only worker
        missed a version would wait forever for groups of that version."""
        if time.monotonic() - self._last_try < RESEND_INTERVAL_S:
            return
        behind = self.sender.disagreeing_workers(self.policy.version)
        if behind or self._published != self.policy.version:
            if behind:
                log.info("sending version %d again to %s", self.policy.version, sorted(behind))
            self.broadcast()
        else:
            self._last_try = time.monotonic()

    def check_workers(self) -> None:
        """Workers that did not load the previous broadcast bit for bit (they catch up at this
        one, which carries the full weights); counted and logged, not fatal."""
        if self._last_broadcast is not None:
            bad = self.sender.disagreeing_workers(self._last_broadcast)
            self.metrics.mismatched.set(len(bad))
            for worker, reason in bad.items():
                log.warning(
                    "worker %s disagrees on version %d: %s", worker, self._last_broadcast, reason
                )
        self._last_broadcast = self.policy.version

    def checkpoint(self) -> None:
        self.last_ckpt = self.policy.save_checkpoint(self.ckpt_root, self.step, self.tokenizer)
        self._ckpt_step = self.step
        self.sender.publish_checkpoint(self.policy.version, str(self.last_ckpt))
        if self.held:
            self.rt.bus.ack_many(self.held)
            self.held.clear()
        prune_checkpoints(self.ckpt_root, self.keep_checkpoints)
        log.info("checkpoint %s (version %d)", self.last_ckpt.name, self.policy.version)

    def handle(self, d: Delivery[TrainingBatch]) -> None:
        batch = d.message
        if batch.batch_id < self.step:
            log.info(
                "batch %d already in checkpoint at step %d: skipped", batch.batch_id, self.step
            )
            self.rt.bus.ack(d)
            return
        t0 = time.perf_counter()
        version_before = self.policy.version
        figures = self.policy.train_batch(batch)
        self.step += 1
        self.held.append(d)
        figures.update(
            step=self.step,
            batch_id=batch.batch_id,
            train_s=time.perf_counter() - t0,
            time=time.time(),
        )
        self.record_progress()
        if self.policy.version != version_before:  # weights changed: send them
            self.broadcast()
        self.metrics.observe_step(figures)
        self.rt.progress()
        self.rt.store.report_step(
            self.rt.run_id,
            StepReport(step=self.step, batch_id=batch.batch_id, version=self.policy.version,
                       time=figures["time"], figures=figures),
        )  # fmt: skip
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(figures) + "\n")
        self.trackers.log_metrics(figures, self.step)
        log.info(
            "step %d  loss %.4f  reward %.3f  acc %.3f  kept %.2f  entropy %.3f  lag %.2f  v%d",
            self.step,
            figures["loss"],
            figures["reward_mean"],
            figures["acc_mean"],
            figures["kept_ratio"],
            figures.get("entropy", float("nan")),
            figures["version_lag"],
            self.policy.version,
        )
        freq = self.rt.spec.trainer.save_freq
        if freq and self.step % freq == 0:
            self.checkpoint()

    def serve(self) -> None:
        total = self.rt.spec.trainer.total_training_steps
        while self.step < total and not self.rt.stopping():
            if self.rt.paused():
                self.rt.idle(0.5)
                continue
            got = self.rt.bus.consume(
                "batches", "learner", CONSUMER, count=1, block_ms=500, reclaim=False
            )
            for d in got:
                self.handle(d)
            if not got:
                self.maybe_resend()
        if self._ckpt_step != self.step:  # also on SIGTERM: nothing trained is lost
            self.checkpoint()
        final = str(self.last_ckpt)
        if self.step >= total:
            self.rt.store.finish(self.rt.run_id, "completed", final_checkpoint=final)
        elif self.rt.state(max_age_s=0).status == "stopping":
            self.rt.store.finish(self.rt.run_id, "stopped", final_checkpoint=final)
        else:  # a signal: the run goes on with the next learner
            self.rt.store.update(self.rt.run_id, final_checkpoint=final)
        log.info("learner done at step %d (version %d)", self.step, self.policy.version)
