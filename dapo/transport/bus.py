"""The message bus: typed, lossless, at-least-once streams between services.

Services get a ``Bus`` injected and never touch a stream directly. Two
implementations keep the same contract: ``RedisBus`` (``dapo.transport.redis_bus``,
what every deployment runs) and ``MemoryBus`` (``dapo.transport.memory_bus``, one
process, for fast tests of the service loops).

The contract:

- **Namespacing**: stream ``prompts`` of run ``r1`` is ``dapo:{r1}:prompts``;
  counters live in per-run hashes (``stats``: dead letters; ``account``: the
  sampler's account).
- **Consumer groups**: ``consume`` hands out decoded deliveries of a group; a
  consumer first re-reads its own pending entries (a restart under the same
  name), and every ``claim_interval_s`` takes over entries another consumer
  left pending for more than ``claim_idle_ms`` (a crashed consumer's work is
  not lost).
- **Ack after downstream**: ``commit`` adds a result downstream, acknowledges
  its source entries and bumps counters as one atomic step, so a crash leaves
  either all of it or none.
- **Idempotency**: a publish with a ``dedupe_key`` happens once per key: a
  redelivered message republished with the same key adds nothing downstream
  and counts nothing twice, even when two consumers race on it.
- **Dead letters**: an entry that fails to decode (bad fields, unknown schema
  version, invalid message) or that was delivered more than
  ``max_deliveries`` times goes to ``dapo:{run}:dead`` with its original
  fields and the reason, is acknowledged, and is counted; the consumer
  carries on with the other entries of the same read.
- **Rejects**: a message decoded fine whose handling fails for a reason of its
  own (not of the infrastructure: ``INFRASTRUCTURE_ERRORS``) is dead-lettered
  alone with ``reject`` (``handle_each`` does it per message), and the others of
  the read go on.
- **The account**: a dead-lettered prompt of the run (a prompt task, rollout
  group or scored group whose group id ``<run>-<seq>`` the sampler dispatched:
  ``seq`` below the account's ``dispatched``) is counted once as ``dead`` in the
  run's account, which frees its in-flight slot: dispatched = trained +
  filtered + stale + dead + in flight.
- **Keep-alive**: a consumer working long on its deliveries ``touch``es them so
  they stay idle less than ``claim_idle_ms`` and are not taken over (and done
  twice) by another consumer.
- **Broadcast streams** (``versions``): ``read`` follows a stream without a
  group, every reader sees every entry; an entry it cannot decode is copied
  to the dead letters (once per reader) and skipped.
- **Holding**: a commit may ``hold`` deliveries instead of acknowledging them: they
  move, in the same atomic step, to the consumer ``holder`` of their group, which
  nobody reads as. They stay pending (so no trim removes them) and are never handed
  out again, until someone acknowledges them by entry id (a training batch refers to
  its groups this way; ``fetch`` reads them).
- **Bounded entries**: no entry larger than ``max_entry_bytes`` (well under Redis's
  512 MiB ``proto-max-bulk-len``) is published: ``EntryTooLarge`` names the stream and
  the size, and nothing of the commit happens.
- **Bounded streams**: entries every group has acknowledged are trimmed;
  ``maxlen`` is a hard cap on top.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from proto.messages import Message

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

STATS = "stats"
"""Counter hash of the bus itself: ``dead.<stream>`` per source stream."""
DEAD_FIELD_BYTES = 64 << 10
"""How much of each original field a dead letter keeps."""
ACCOUNT = "account"
"""The run's account hash (``proto.state.ACCOUNT_FIELDS``); dead-lettered prompts count there."""
PROTO_MAX_BULK_LEN = 512 << 20
"""Redis's default ``proto-max-bulk-len``: no field may be larger."""
HOLDER = "held"
"""Default consumer that held deliveries move to (``proto.messages.HELD_CONSUMER``)."""
PROMPT_STREAMS = ("prompts", "rollouts", "scored")
"""Streams whose every message stands for one dispatched prompt (by its group id)."""


class BusSettings(BaseModel):
    maxlen: int = Field(100_000, ge=10)
    """Hard cap on a stream's length (approximate trim); normal trimming is by acknowledgement."""
    trim_every: int = Field(64, ge=1)
    """Publishes between acknowledgement-based trims of a stream."""
    claim_idle_ms: int = Field(30_000, ge=1)
    """Pending entries idle this long are taken over from their (presumed dead) consumer."""
    claim_interval_s: float = Field(5.0, ge=0.0)
    """How often a consumer looks for entries to take over."""
    max_deliveries: int = Field(5, ge=1)
    """Deliveries after which an entry is dead-lettered."""
    dedupe_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    """How long idempotency keys are remembered."""
    max_entry_bytes: int = Field(64 << 20, ge=4096, le=PROTO_MAX_BULK_LEN // 2)
    """Largest stream entry a publish may write (fields and values); Redis refuses any
    field over its 512 MiB ``proto-max-bulk-len``, and an entry this size already costs
    seconds to copy."""


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """One decoded entry handed to a consumer; ack or commit it when done."""

    stream: str
    group: str
    entry_id: str
    message: M
    deliveries: int = 1


@dataclass(frozen=True)
class GroupLag:
    pending: int
    """Delivered but not acknowledged."""
    lag: int
    """Entries not yet delivered to the group (-1 when the backend cannot tell)."""


class Bus(Protocol):
    """What services depend on (see the module docstring for the guarantees)."""

    run_id: str

    def publish(self, stream: str, msg: Message, *, dedupe_key: str | None = None) -> str | None:
        """Append ``msg``; its entry id, or None if ``dedupe_key`` was seen before."""
        ...

    def publish_many(
        self,
        stream: str,
        msgs: Sequence[Message],
        dedupe_keys: Sequence[str | None] | None = None,
        acks: Sequence[Delivery | None] | None = None,
    ) -> list[str | None]:
        """Several publish(+ack) commits as one atomic step."""
        ...

    def commit(
        self,
        *,
        stream: str | None = None,
        msg: Message | None = None,
        dedupe_key: str | None = None,
        ack: Sequence[Delivery] = (),
        counters: Mapping[str, int] | None = None,
        counter: str = STATS,
        hold: Sequence[Delivery] = (),
        holder: str = HOLDER,
    ) -> str | None:
        """Atomically: publish ``msg`` (once per ``dedupe_key``), ack ``ack``, move ``hold`` to
        consumer ``holder`` of their group, add ``counters`` to the run's counter hash
        ``counter``. With a dedupe key seen before nothing is published or counted, but the
        acks and moves still happen."""
        ...

    def fetch(
        self, stream: str, entry_ids: Sequence[str], expected: type[M] | None = None
    ) -> list[M | None]:
        """The messages of entries ``entry_ids`` of ``stream`` (in one round trip), in order;
        None for an entry that is gone or cannot be decoded."""
        ...

    def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int = 16,
        block_ms: int = 1000,
        expected: type[M] | None = None,
        reclaim: bool = True,
    ) -> list[Delivery[M]]:
        """Up to ``count`` deliveries: own pending, then reclaimed, then new. A consumer that
        holds entries unacknowledged on purpose passes ``reclaim=False``."""
        ...

    def ack(self, delivery: Delivery) -> None: ...

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Handling this message failed for a reason of its own: dead-letter it now (its
        original fields and ``reason`` kept, counted; a prompt of the run also in the
        account) and acknowledge it."""
        ...

    def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Still working on these: reset their idle time so no other consumer reclaims them.
        Entries no longer pending (acknowledged, or taken over meanwhile) are left alone."""
        ...

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge all of ``deliveries``, of whatever streams and groups, as one atomic
        step."""
        ...

    def nack(self, delivery: Delivery, reason: str) -> None:
        """Processing failed: keep the entry pending for redelivery (dead-lettered after N)."""
        ...

    def read(self, stream: str, after: str = "0-0") -> tuple[str, list[Message]]:
        """The decodable entries of a broadcast stream after entry ``after``, and the id to
        read after next time."""
        ...

    def counters(self, counter: str) -> dict[str, int]:
        """The run's counter hash ``counter``."""
        ...

    def dead_count(self, stream: str | None = None) -> int:
        """Entries dead-lettered from ``stream`` (all streams when None)."""
        ...

    def lag(self, stream: str) -> dict[str, GroupLag]:
        """Per consumer group: pending and undelivered entries."""
        ...

    def length(self, stream: str) -> int: ...


class EntryTooLarge(ValueError):
    """A message whose encoded entry exceeds ``BusSettings.max_entry_bytes``."""


def entry_bytes(fields: Mapping) -> int:
    """Bytes of a stream entry: its field names and values."""
    return sum(len(k) + len(v) for k, v in fields.items())


def check_entry_size(stream: str, msg: Message, fields: Mapping, limit: int) -> None:
    """Raise ``EntryTooLarge`` when the encoded ``fields`` of ``msg`` exceed ``limit``."""
    size = entry_bytes(fields)
    if size > limit:
        raise EntryTooLarge(
            f"a {msg.kind} entry of {size} bytes ({size / 2**20:.1f} MiB) for stream "
            f"{stream!r} exceeds max_entry_bytes={limit} ({limit / 2**20:.1f} MiB)"
        )


class FencedOut(RuntimeError):
    """This process no longer holds the lease its writes are fenced by
    (``dapo.runtime.lease``)."""


Fence = tuple[str, bytes]
"""(lease key, the value this process set there): a fenced write happens only while the key
still holds that value."""


def check_fence(pipe, fence: Fence | None) -> None:
    """Inside a WATCH block on the fence key: raise ``FencedOut`` unless the lease is still
    ours (the WATCH then aborts the transaction if it moves before EXEC)."""
    if fence is not None and pipe.get(fence[0]) != fence[1]:
        raise FencedOut(f"lease {fence[0]} is no longer held by this process")


def id_tuple(entry_id: str | bytes) -> tuple[int, int]:
    """``"1700000000000-3"`` -> (1700000000000, 3): entry ids order as these tuples."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def dead_letter_record(
    stream: str, group: str, entry_id: str, fields: Mapping, reason: str
) -> dict[str, bytes | str]:
    """The dead-letter entry of one source entry: where it came from, why, and its original
    fields under ``orig.<name>``, each cut to ``DEAD_FIELD_BYTES`` (the full size kept in
    ``size.<name>``): the dead-letter stream is for diagnosis and must stay small whatever
    was thrown at the bus. Field names that are not UTF-8 are kept escaped, so even a
    hostile entry can be moved aside."""
    record: dict[str, bytes | str] = {
        "stream": stream,
        "group": group,
        "entry_id": entry_id,
        "reason": reason[:4000],
    }
    for name, value in list(fields.items())[:64]:
        key = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)
        raw = value if isinstance(value, bytes | bytearray | memoryview) else str(value).encode()
        record[f"orig.{key[:200]}"] = bytes(raw[:DEAD_FIELD_BYTES])
        if len(raw) > DEAD_FIELD_BYTES:
            record[f"size.{key[:200]}"] = str(len(raw))
    return record


INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    MemoryError,
    FencedOut,
)
"""Failures of the machinery, not of a message: they end the process (which resumes from
Redis), never dead-letter what was being handled."""


def dead_prompt(run_id: str, stream: str, msg: Message | None) -> str | None:
    """The group id ``msg`` stands for when it is a prompt the run's sampler dispatched
    (``<run_id>-<seq>`` on a prompt stream), else None: a foreign or forged entry is
    dead-lettered but never counted in the account."""
    if stream not in PROMPT_STREAMS or msg is None:
        return None
    group_id = getattr(msg, "group_id", None)
    if getattr(msg, "run_id", None) != run_id or not isinstance(group_id, str):
        return None
    return group_id if re.fullmatch(re.escape(run_id) + r"-\d+", group_id) else None


def handle_each(
    bus: Bus,
    deliveries: Sequence[Delivery[M]],
    handle: Callable[[Delivery[M]], None],
    fatal: tuple[type[BaseException], ...] = (),
) -> int:
    """``handle`` each delivery on its own: one that raises a non-infrastructure error (not
    ``INFRASTRUCTURE_ERRORS`` nor ``fatal``) is rejected alone and the others go on.
    Returns how many were rejected."""
    rejected = 0
    for d in deliveries:
        try:
            handle(d)
        except INFRASTRUCTURE_ERRORS + fatal:
            raise
        except Exception as exc:  # noqa: BLE001 -- whatever a hostile message provokes
            reject_with_log(bus, d, exc)
            rejected += 1
    return rejected


def reject_with_log(bus: Bus, d: Delivery, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    log.error("rejecting %s entry %s: %s", d.stream, d.entry_id, reason[:500])
    bus.reject(d, reason)


@contextmanager
def keep_alive(bus: Bus, deliveries: Sequence[Delivery], every_s: float) -> Iterator[None]:
    """While the block runs, ``touch`` ``deliveries`` every ``every_s`` seconds from a helper
    thread, so however long the work takes no other consumer reclaims (and redoes) it. A
    failed touch is logged, not raised: the work goes on, at worst done twice (harmless,
    every publish is idempotent)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                bus.touch(deliveries)
            except Exception as exc:  # noqa: BLE001 -- a keep-alive must not kill the work
                log.warning("could not touch %d entries: %s", len(deliveries), exc)

    thread = threading.Thread(target=beat, name="bus-keep-alive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
