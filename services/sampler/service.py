"""The sampler service: dispatch prompts, filter scored groups, publish training batches.

Its state lives in Redis so a restart loses nothing: the account hash
``dapo:{run}:account`` doubles as the dataset cursor (``dispatched`` prompts
so far fixes the epoch and position), and kept groups waiting for a batch stay
*unacknowledged* in the ``scored`` stream, so a restarted sampler gets them
back. Every dispatch, filter decision and batch is one atomic bus commit that
acks its inputs and bumps the account together.

A batch travels by reference (``TrainingBatchRef``: its groups' entry ids on
``scored``), so no entry grows with the batch. Publishing it moves its groups, in
the same commit, from this sampler's pending list to the consumer ``held`` of the
``sampler`` group: still pending (a trim keeps them), never handed to a sampler
again; the learner reads them by id and acknowledges them with the batch once a
checkpoint holds it.

Hostile input is set aside one message at a time: a scored group of another run,
or one whose classification fails, is dead-lettered alone (a dead-lettered prompt of the run counts as ``dead`` in the account and
frees its in-flight slot); a ``versions`` entry it cannot decode is skipped and
counted by the bus, one of another run or going backwards is ignored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from dapo.data.prompts import PromptSource
from dapo.runtime.service import ServiceContext
from dapo.transport.bus import Delivery, handle_each
from proto.messages import (
    HELD_CONSUMER,
    SCORED_GROUP,
    BatchStats,
    PromptTask,
    SamplingParams,
    ScoredGroup,
    TrainingBatchRef,
)
from proto.runspec import RunSpec
from proto.state import account_from_counters
from services.sampler.batcher import (
    BatchAssembler,
    check_gen_budget,
    gen_rounds,
    training_version,
    useful_prompts,
)

log = logging.getLogger(__name__)
ACCOUNT = "account"
"""The counter hash of the sampler's account (``proto.state.ACCOUNT_FIELDS``)."""


class SamplerMetrics:
    def __init__(self, registry) -> None:
        self.groups = Counter(
            "dapo_sampler_groups", "Scored groups by outcome", ["outcome"], registry=registry
        )
        self.dispatched = Counter(
            "dapo_sampler_prompts_dispatched", "Prompt tasks dispatched", registry=registry
        )
        self.batches = Counter(
            "dapo_sampler_batches", "Training batches published", registry=registry
        )
        self.in_flight = Gauge(
            "dapo_sampler_in_flight", "Prompts dispatched, not resolved", registry=registry
        )
        self.held = Gauge(
            "dapo_sampler_held_groups", "Kept groups waiting for a batch", registry=registry
        )
        self.version_lag = Histogram(
            "dapo_sampler_version_lag",
            "Published versions since the group's generating version",
            buckets=(0, 1, 2, 3, 4, 8),
            registry=registry,
        )
        self.stream_lag = Gauge(
            "dapo_stream_lag",
            "Entries not yet delivered to the group",
            ["stream", "group"],
            registry=registry,
        )
        self.dead = Gauge(
            "dapo_dead_letters",
            "Messages dead-lettered, by source stream",
            ["stream"],
            registry=registry,
        )
        self.stream_pending = Gauge(
            "dapo_stream_pending",
            "Delivered, unacknowledged entries",
            ["stream", "group"],
            registry=registry,
        )


@dataclass
class Sampler:
    rt: ServiceContext
    spec: RunSpec
    source: PromptSource
    metrics: SamplerMetrics
    consumer: str = "sampler-0"
    published: int = 0
    """Newest policy version the learner has published (rollout workers can hold it)."""
    _versions_cursor: str = "0-0"
    _assembler: BatchAssembler = field(init=False)
    _stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._assembler = BatchAssembler(self.spec.data.train_batch_size, self.spec.algorithm)
        self._reset_stats()

    def account(self) -> dict[str, int]:
        return account_from_counters(self.rt.bus.counters(ACCOUNT))

    def _reset_stats(self) -> None:
        self._stats = {
            k: 0 for k in ("kept", "filtered_all_correct", "filtered_all_wrong", "dropped_stale")
        }

    # -- versions ------------------------------------------------------------
    def refresh_versions(self) -> None:
        """Follow the learner's announcements (read without a group: every reader sees all)."""
        self._versions_cursor, versions = self.rt.bus.read("versions", self._versions_cursor)
        for msg in versions:
            if msg.run_id != self.rt.run_id:
                log.error("ignoring a version announcement of run %r", msg.run_id)
                continue
            self.published = max(self.published, msg.version)

    def train_version(self, batch_id: int) -> int:
        """The policy version that will train batch ``batch_id`` (``batcher.training_version``)."""
        state = self.rt.state(max_age_s=0.05)
        return training_version(batch_id, state.step, state.policy_version)

    # -- dispatch --------------------------------------------------------------
    def dispatch(self) -> int:
        acc = self.account()
        if acc["batches"] >= self.spec.trainer.total_training_steps:
            return 0
        seen = acc["trained"] + len(self._assembler.held) + self._filtered(acc)
        kept = acc["trained"] + len(self._assembler.held)
        room = useful_prompts(
            published=self.published,
            train_version=self.train_version(acc["batches"]),
            max_staleness=self.spec.algorithm.max_staleness,
            train_batch_size=self.spec.data.train_batch_size,
            held=len(self._assembler.held),
            in_flight=acc["in_flight"] - len(self._assembler.held),
            keep_rate=kept / seen if seen else 1.0,
            limit=self.spec.in_flight_limit,
        )
        for seq in range(acc["dispatched"], acc["dispatched"] + room):
            task = self._task(seq)
            self.rt.bus.commit(
                stream="prompts",
                msg=task,
                dedupe_key=task.group_id,
                counters={"dispatched": 1},
                counter=ACCOUNT,
            )
        self.metrics.dispatched.inc(room)
        return room

    @staticmethod
    def _filtered(acc: dict[str, int]) -> int:
        return acc["filtered_all_correct"] + acc["filtered_all_wrong"]

    def _task(self, seq: int) -> PromptTask:
        item = self.source.item(seq)
        ro = self.spec.rollout
        return PromptTask(
            run_id=self.rt.run_id,
            group_id=f"{self.rt.run_id}-{seq}",
            prompt_id=item.prompt_id,
            epoch=item.epoch,
            prompt_text=item.text,
            prompt_ids=item.token_ids,
            ground_truth=item.ground_truth,
            data_source=item.data_source,
            sampling=SamplingParams(
                n=ro.n,
                temperature=ro.temperature,
                top_p=ro.top_p,
                top_k=ro.top_k,
                max_new_tokens=self.spec.data.max_response_length,
            ),
            dispatch_version=self.published,
        )

    # -- scored groups -----------------------------------------------------------
    def absorb(self, deliveries: list[Delivery[ScoredGroup]], train_version: int) -> None:
        """Classify scored groups for the batch trained by ``train_version``. A kept group stays
        unacknowledged until its batch is published (a restarted sampler gets it back); what
        is not kept is acknowledged and counted at once, a filtered group also against the
        dynamic-sampling budget (``scored_since_batch``; kept groups count there through
        ``held``)."""
        handle_each(self.rt.bus, deliveries, lambda d: self._absorb_one(d, train_version))
        self.drop_stale(train_version)

    def _absorb_one(self, d: Delivery[ScoredGroup], train_version: int) -> None:
        if d.message.run_id != self.rt.run_id:
            raise ValueError(f"group {d.message.group_id!r} of run {d.message.run_id!r}")
        if any(g.group_id == d.message.group_id for g, _ in self._assembler.held):
            log.warning("group %s is held already: the copy is dropped", d.message.group_id)
            self.rt.bus.ack(d)
            return
        outcome = self._assembler.offer(d.message, d, train_version)
        self.metrics.groups.labels(outcome).inc()
        self.rt.progress()
        self.metrics.version_lag.observe(max(train_version - d.message.policy_version, 0))
        self._stats[outcome] += 1
        if outcome == "kept":
            return
        counters = {outcome: 1}
        if outcome != "dropped_stale":
            counters["scored_since_batch"] = 1
        self.rt.bus.commit(ack=[d], counters=counters, counter=ACCOUNT)

    def drop_stale(self, train_version: int) -> None:
        """Held groups too old for the batch trained by ``train_version`` go, counted."""
        for _, d in self._assembler.expire_stale(train_version):
            self._stats["dropped_stale"] += 1
            self.metrics.groups.labels("dropped_stale").inc()
            self.rt.bus.commit(ack=[d], counters={"dropped_stale": 1}, counter=ACCOUNT)

    def maybe_publish_batch(self) -> bool:
        acc = self.account()
        if acc["batches"] >= self.spec.trainer.total_training_steps or not self._assembler.ready():
            return False
        items = self._assembler.take()
        groups = [g for g, _ in items]
        version = self.train_version(acc["batches"])
        lag = float(np.mean([version - g.policy_version for g in groups]))
        batch = TrainingBatchRef(
            run_id=self.rt.run_id,
            batch_id=acc["batches"],
            entry_ids=[d.entry_id for _, d in items],
            group_ids=[g.group_id for g in groups],
            stats=BatchStats(
                gen_rounds=gen_rounds(
                    acc["scored_since_batch"] + len(groups), self.spec.data.train_batch_size
                ),
                mean_version_lag=max(lag, 0.0),
                **self._stats,
            ),
        )
        # the groups are not acknowledged but handed to the holder consumer, in the same
        # step as the reference: pending, so never trimmed, never read again by a sampler
        self.rt.bus.commit(
            stream="batches",
            msg=batch,
            dedupe_key=f"batch-{batch.batch_id}",
            hold=[d for _, d in items],
            holder=HELD_CONSUMER,
            counter=ACCOUNT,
            counters={
                "trained": len(groups),
                "batches": 1,
                "scored_since_batch": -acc["scored_since_batch"],
            },
        )
        self.metrics.batches.inc()
        self.rt.progress()
        log.info("batch %d published: %d groups, %s", batch.batch_id, len(groups), self._stats)
        self._reset_stats()
        return True

    def step(self) -> None:
        self.refresh_versions()
        self.dispatch()
        got = self.rt.bus.consume(
            "scored", SCORED_GROUP, self.consumer, count=256, block_ms=200, reclaim=False
        )
        self.absorb(got, self.train_version(self.account()["batches"]))
        while self.maybe_publish_batch():
            self.drop_stale(self.train_version(self.account()["batches"]))
        self._check_budget()
        self._observe()

    def _check_budget(self) -> None:
        acc = self.account()
        if acc["batches"] < self.spec.trainer.total_training_steps:
            check_gen_budget(
                acc["scored_since_batch"] + len(self._assembler.held),
                self.spec.data.train_batch_size,
                self.spec.algorithm.filter_groups.max_num_gen_batches,
            )

    def _observe(self) -> None:
        acc = self.account()
        self.metrics.in_flight.set(acc["in_flight"])
        self.metrics.held.set(len(self._assembler.held))
        for stream in ("prompts", "rollouts", "scored", "batches"):
            self.metrics.dead.labels(stream).set(self.rt.bus.dead_count(stream))
            for group, lag in self.rt.bus.lag(stream).items():
                self.metrics.stream_lag.labels(stream, group).set(max(lag.lag, 0))
                self.metrics.stream_pending.labels(stream, group).set(lag.pending)

    def tick(self) -> None:
        """One turn of the service loop: idle while paused, else a step; a step that finds the
        run cannot go on (the dynamic-sampling budget is spent) fails the run, then raises."""
        if self.rt.paused():
            self.rt.idle(0.5)
            return
        try:
            self.step()
        except RuntimeError as exc:
            self.rt.fail(str(exc))
            raise


def serve(rt: ServiceContext, source: PromptSource, metrics: SamplerMetrics) -> None:
    """The sampler's loop with a new ``Sampler``: entered again after a Redis outage, it
    re-reads the groups it held from its fresh bus, as a restarted sampler does. ``metrics``
    are made once per process, however often the loop is entered."""
    sampler = Sampler(rt, rt.spec, source, metrics)
    last_log = 0.0
    while not rt.stopping():
        sampler.tick()
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("account %s", sampler.account())
