"""The learner's loop: batches in, optimizer steps, weights out, checkpoints on disk.

Batches arrive by reference (``TrainingBatchRef``): the learner reads the groups
from ``scored`` by entry id, where they stay pending under the sampler group's holder
consumer until the batch is acknowledged; the batch and its groups are acknowledged
together, in one transaction, so neither outlives the other.

Exactly-once training across crashes: a batch is acknowledged only once a
checkpoint containing its update is on disk. A restarted learner (same
consumer name) resumes from the newest checkpoint and is handed back every
batch it had not yet checkpointed; batches whose id is below the
checkpoint's step are acknowledged and skipped; one trained since the last checkpoint
and delivered again (the sampler republished it after losing its idempotency key) is
held with the others, never acknowledged before a checkpoint holds it. A batch that
is not this run's (a poison entry) is dead-lettered alone.

A full checkpoint disk does not crash-loop the learner: the partial save is removed,
old checkpoints are pruned down to the newest complete one and the save is tried once
more; if that fails too the run is marked failed with the reason. ``metrics.jsonl``
gets whole lines only (a failed write is cut back; a line torn by a crash is dropped
at start).

The loop sees the policy, the weight sender and the tokenizer only through the
protocols of ``services.learner.seams``, so it is the same on one rank or many
and runs in tests over ``MemoryBus`` with in-memory stand-ins.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dapo.runtime.service import ServiceContext
from dapo.tracking import Trackers
from dapo.transport.bus import Delivery
from dapo.weights.registry import WeightSyncError
from proto.messages import TrainingBatchRef, WeightVersion
from proto.state import StepReport
from services.learner.batch_refs import read_batch, with_groups
from services.learner.checkpoint import newest_checkpoint, prune_checkpoints
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
    _rewound_at: int | None = None
    """The step at which the pending list was last read again for a batch not yet come."""

    def __post_init__(self) -> None:
        self.metrics = LearnerMetrics(self.rt.registry)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_file = self.run_dir / "metrics.jsonl"
        if self.last_ckpt is not None:  # resumed: that checkpoint already holds this step
            self._ckpt_step = self.step
        drop_torn_line(self.metrics_file)

    def announce(self, checksum: str, num_bytes: int, version: int | None = None) -> None:
        """Tell everyone that rollout workers hold ``version`` (default: the policy's) now
        (the sampler dispatches for the batches it may train by it)."""
        version = self.policy.version if version is None else version
        msg = WeightVersion(
            run_id=self.rt.run_id,
            version=version,
            step=self.step,
            checksum=checksum,
            num_bytes=num_bytes,
            checkpoint_dir=str(self.last_ckpt) if self.last_ckpt else None,
        )
        self.rt.bus.publish("versions", msg)
        self._published = version

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
        the learner waits for its next batch (``maybe_resend``). A double-buffering sender
        (``WeightSender.start``) takes the weights and sends them while the next step
        trains; ``collect_sent`` announces each version once it arrived."""
        version = self.policy.version
        self._last_try = time.monotonic()
        if getattr(self.sender, "double_buffer", False):
            self.collect_sent()
            self.sender.start(version, self.policy.gather_weights())
            return
        try:
            stats = self.sender.broadcast(version, self.policy.gather_weights())
        except WeightSyncError as exc:
            log.warning("weight broadcast of version %d failed: %s (sent again)", version, exc)
            self.metrics.sync_failures.inc()
            return
        self.sent(stats)

    def collect_sent(self) -> None:
        """Double buffering: the versions whose background broadcast ended since last time."""
        for outcome in self.sender.finished():
            if isinstance(outcome, WeightSyncError):
                log.warning("weight broadcast failed: %s (sent again)", outcome)
                self.metrics.sync_failures.inc()
            else:
                self.sent(outcome)

    def sent(self, stats) -> None:
        """A broadcast of ``stats.version`` ended: announced if it reached a worker."""
        self.metrics.observe_sync(stats)
        if stats.members and self._published != stats.version:
            self.announce(stats.checksum, stats.bytes, stats.version)
        self.check_workers(stats.version)

    def maybe_resend(self) -> None:
        """While no batch arrives: send the current version again if the last broadcast did
        not reach every live worker. Without it, a strictly on-policy run whose only worker
        missed a version would wait forever for groups of that version."""
        if getattr(self.sender, "double_buffer", False):
            self.collect_sent()
            if self.sender.busy:  # still on its way: nothing to resend yet
                return
        if time.monotonic() - self._last_try < RESEND_INTERVAL_S:
            return
        behind = self.sender.disagreeing_workers(self.policy.version)
        if behind or self._published != self.policy.version:
            if behind:
                log.info("sending version %d again to %s", self.policy.version, sorted(behind))
            self.broadcast()
        else:
            self._last_try = time.monotonic()

    def check_workers(self, version: int) -> None:
        """Workers that did not load the previous broadcast bit for bit (they catch up at this
        one, of ``version``, which carries the full weights); counted and logged, not fatal."""
        if self._last_broadcast is not None:
            bad = self.sender.disagreeing_workers(self._last_broadcast)
            self.metrics.mismatched.set(len(bad))
            for worker, reason in bad.items():
                log.warning(
                    "worker %s disagrees on version %d: %s", worker, self._last_broadcast, reason
                )
        self._last_broadcast = version

    def checkpoint(self) -> None:
        try:
            path = self.policy.save_checkpoint(self.ckpt_root, self.step, self.tokenizer)
        except Exception as exc:
            if not disk_full(exc, self.ckpt_root):
                raise
            path = self._save_after_freeing_space(exc)
        self.last_ckpt = path
        self._ckpt_step = self.step
        self.sender.publish_checkpoint(self.policy.version, str(self.last_ckpt))
        if self.held:
            self.rt.bus.ack_many([a for d in self.held for a in with_groups(d)])
            self.held.clear()
        prune_checkpoints(self.ckpt_root, self.keep_checkpoints)
        log.info("checkpoint %s (version %d)", self.last_ckpt.name, self.policy.version)

    def _save_after_freeing_space(self, first: Exception) -> Path:
        """The disk is full: drop the partial save and every checkpoint but the newest
        complete one, then try once more; a second failure fails the run, saying why."""
        removed = free_checkpoint_space(self.ckpt_root)
        log.error("checkpoint at step %d: %s; removed %s, trying again",
                  self.step, first, [p.name for p in removed] or "nothing")  # fmt: skip
        try:
            return self.policy.save_checkpoint(self.ckpt_root, self.step, self.tokenizer)
        except Exception as exc:
            if not disk_full(exc, self.ckpt_root):
                raise
            free_checkpoint_space(self.ckpt_root)
            reason = (f"checkpoint disk full: no room for step {self.step} in "
                      f"{self.ckpt_root} even after pruning to the newest checkpoint ({exc})")  # fmt: skip
            self.rt.fail(reason)
            raise CheckpointDiskFull(reason) from exc

    def foreign(self, ref: TrainingBatchRef) -> str | None:
        """Why ``ref`` cannot be one the run's sampler published, or None."""
        if ref.run_id != self.rt.run_id:
            return f"batch of run {ref.run_id!r}, not {self.rt.run_id!r}"
        if len(set(ref.group_ids)) != len(ref.group_ids):
            return "batch whose groups repeat"
        return None

    def set_aside(self, d: Delivery[TrainingBatchRef]) -> bool:
        """Deal with a batch not to be trained now: another run's (dead-lettered), one a
        checkpoint holds (acknowledged), one trained since the last checkpoint (held), one
        ahead of its turn (the pending list is read again). False: train it."""
        batch = d.message
        if (why := self.foreign(batch)) is not None:
            log.error("batch entry %s rejected: %s", d.entry_id, why)
            self.rt.bus.reject(d, why)
            return True
        if batch.batch_id < self.step:
            if batch.batch_id < self._ckpt_step:
                log.info("batch %d already in checkpoint at step %d: skipped",
                         batch.batch_id, self._ckpt_step)  # fmt: skip
                self.rt.bus.ack_many(with_groups(d))
            else:  # trained since the last checkpoint: acknowledged by the next one
                log.info("batch %d already trained at step %d: held", batch.batch_id, self.step)
                self.held.append(d)
            return True
        if batch.batch_id > self.step and self._rewound_at != self.step:
            # batches come in order; one ahead of its turn means the due one sits in this
            # consumer's pending list (taken there by a learner that has lost the lease):
            # read that list again, once; if the due batch is not there, go on without it
            log.error("batch %d came while batch %d is due: reading the pending list again",
                      batch.batch_id, self.step)  # fmt: skip
            self._rewound_at = self.step
            self.rt.bus.nack(d, f"batch {batch.batch_id} came before batch {self.step}")
            return True
        return False

    def handle(self, d: Delivery[TrainingBatchRef]) -> None:
        if self.set_aside(d):
            return
        try:
            batch = read_batch(self.rt.bus, d.message)
        except ValueError as exc:
            log.error("batch entry %s rejected: %s", d.entry_id, exc)
            self.rt.bus.reject(d, str(exc))
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
        # the local record first: if Redis fails below, the service shell waits the outage
        # out and re-enters the loop with this step done, its line written
        append_line(self.metrics_file, json.dumps(figures))
        self.trackers.log_metrics(figures, self.step)
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
        # on the cadence, or late when one was missed (a Redis outage cut its step short)
        if freq and (self.step % freq == 0 or self.step - max(self._ckpt_step, 0) > freq):
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


class CheckpointDiskFull(RuntimeError):
    """No checkpoint fits on the disk, even with only the newest one kept."""


def disk_full(exc: BaseException, root: Path) -> bool:
    """Whether a failed save ran out of disk. Writers report it their own way: ``OSError``
    ENOSPC (plain files), a message naming it (safetensors), or a bare stream error
    (``torch.save``); so a failure also counts when what is left free would not hold the
    newest checkpoint again."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
    newest = newest_checkpoint(root)
    need = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) if newest else 1 << 20
    try:
        return shutil.disk_usage(root).free < need
    except OSError:
        return False


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_checkpoint_space(root: Path) -> list[Path]:
    """Remove partial saves (``.tmp-*``) and every checkpoint but the newest complete one;
    returns what went."""
    if not root.is_dir():
        return []
    keep = newest_checkpoint(root)
    gone = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    gone += [p for p in root.iterdir() if p.name.startswith("step_") and p != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline whole or not at all: a failed write (a full disk) is cut
    back to where the file ended, so the file never holds a torn line. Unbuffered, so the
    cut cannot be undone by a buffer flushed later."""
    data = memoryview((line + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def drop_torn_line(path: Path) -> None:
    """A crash in the middle of ``append_line`` can leave a last line without its newline:
    cut it, so the next line starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("dropping a torn last line of %s (%d bytes)", path, len(data) - keep)
        f.truncate(keep)
