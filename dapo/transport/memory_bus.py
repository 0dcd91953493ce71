"""``MemoryBus``: the ``Bus`` contract (``dapo.transport.bus``) in one process.

``MemoryBroker`` plays the Redis server: streams of entries stored encoded,
exactly as ``RedisBus`` writes them (so decoding, dead-lettering and
idempotency take the same paths), consumer groups with a cursor and a pending
list (owner, delivery count, last delivery time), counters and dead letters.
``MemoryBus`` plays one process's client over it: like ``RedisBus`` it keeps
each consumer's re-read of its own pending entries, so a new ``MemoryBus`` over
the same broker is a restarted process. There is no blocking: a consume with
nothing to hand out returns at once, which is what a single-threaded test of a
service loop wants. The broker's lock makes each call atomic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dapo.transport.bus import (
    ACCOUNT,
    HOLDER,
    STATS,
    BusSettings,
    Delivery,
    GroupLag,
    M,
    check_entry_size,
    dead_letter_record,
    dead_prompt,
    id_tuple,
)
from proto.codec import DecodeError, decode, encode
from proto.keys import check_run_id
from proto.messages import STREAM_MESSAGES, Message


@dataclass
class _Pending:
    consumer: str
    deliveries: int
    delivered_at: float


@dataclass
class _Group:
    cursor: int = 0
    """Sequence number of the last entry handed out."""
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass
class MemoryBroker:
    """What Redis holds for one run's bus; share it between ``MemoryBus`` clients."""

    streams: dict[str, dict[int, dict]] = field(default_factory=dict)
    """stream -> sequence number -> encoded fields (entry id ``"<seq>-0"``)."""
    dead: list[dict] = field(default_factory=list)
    """Dead-letter records, oldest first."""
    groups: dict[tuple[str, str], _Group] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    errors: dict[tuple[str, int], str] = field(default_factory=dict)
    seq: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)


@dataclass
class MemoryBus:
    """``Bus`` over a ``MemoryBroker``; ``clock`` (seconds) drives reclaiming."""

    run_id: str
    settings: BusSettings = field(default_factory=BusSettings)
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    clock: object = time.monotonic
    _own: dict[tuple[str, str, str], int | None] = field(default_factory=dict)
    """(stream, group, consumer) -> sequence number the re-read of the consumer's own
    pending entries has reached (None: done); a new client starts at 0, as a restarted
    ``RedisBus`` process does."""
    _last_claim: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @property
    def streams(self) -> dict[str, dict[int, dict]]:
        return self.broker.streams

    @property
    def dead(self) -> list[dict]:
        return self.broker.dead

    @property
    def _lock(self) -> threading.RLock:
        return self.broker.lock

    # -- publish -------------------------------------------------------------
    def append(self, stream: str, fields: Mapping) -> str:
        """Add raw stream fields (what a foreign writer could put there); returns the id."""
        with self._lock:
            self.broker.seq += 1
            seq = self.broker.seq
            entries = self.streams.setdefault(stream, {})
            entries[seq] = {_b(k): bytes(v) if isinstance(v, memoryview) else v
                            for k, v in fields.items()}  # fmt: skip
            while len(entries) > self.settings.maxlen:
                entries.pop(next(iter(entries)))
            return f"{seq}-0"

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
        if msg is not None and not stream:
            raise ValueError("commit: a message needs a stream")
        for sources in (ack, hold):
            if sources and len({(d.stream, d.group) for d in sources}) != 1:
                raise ValueError("a commit acknowledges (holds) entries of one stream and group")
        fields = encode(msg) if msg is not None else None
        if fields is not None:
            check_entry_size(stream, msg, fields, self.settings.max_entry_bytes)
        with self._lock:
            fresh = dedupe_key is None or (stream, dedupe_key) not in self.broker.seen
            entry_id = None
            if msg is not None and fresh:
                if dedupe_key is not None:
                    self.broker.seen.add((stream, dedupe_key))
                entry_id = self.append(stream, fields)
            self.ack_many(ack)
            self._hold(hold, holder)
            if fresh:
                hashed = self.broker.counters.setdefault(counter, {})
                for name, delta in (counters or {}).items():
                    hashed[name] = hashed.get(name, 0) + int(delta)
            return entry_id

    def _hold(self, deliveries: Sequence[Delivery], holder: str) -> None:
        """Move pending entries to ``holder`` (as XCLAIM JUSTID: the delivery count stays)."""
        for d in deliveries:
            g = self.broker.groups.get((d.stream, d.group))
            p = g.pending.get(id_tuple(d.entry_id)[0]) if g is not None else None
            if p is not None:
                p.consumer, p.delivered_at = holder, self.clock()

    def fetch(
        self, stream: str, entry_ids: Sequence[str], expected: type[M] | None = None
    ) -> list[M | None]:
        cls = expected or STREAM_MESSAGES[stream]
        out: list[M | None] = []
        with self._lock:
            for entry_id in entry_ids:
                fields = self.streams.get(stream, {}).get(id_tuple(entry_id)[0])
                try:
                    out.append(decode(fields, cls) if fields is not None else None)
                except DecodeError:
                    out.append(None)
        return out

    def publish(self, stream: str, msg: Message, *, dedupe_key: str | None = None) -> str | None:
        return self.commit(stream=stream, msg=msg, dedupe_key=dedupe_key)

    def publish_many(
        self,
        stream: str,
        msgs: Sequence[Message],
        dedupe_keys: Sequence[str | None] | None = None,
        acks: Sequence[Delivery | None] | None = None,
    ) -> list[str | None]:
        dedupe_keys = dedupe_keys or [None] * len(msgs)
        acks = acks or [None] * len(msgs)
        with self._lock:
            return [
                self.commit(stream=stream, msg=m, dedupe_key=k, ack=[d] if d else [])
                for m, k, d in zip(msgs, dedupe_keys, acks, strict=True)
            ]

    # -- consume ---------------------------------------------------------------
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
        with self._lock:
            g = self.broker.groups.setdefault((stream, group), _Group())
            entries = self.streams.setdefault(stream, {})
            now = self.clock()
            seqs = self._own_pending(g, (stream, group, consumer), count)
            if not seqs and reclaim and self._may_claim((stream, group, consumer), now):
                idle_s = self.settings.claim_idle_ms / 1000
                seqs = [s for s, p in g.pending.items() if now - p.delivered_at >= idle_s][:count]
            if not seqs:
                seqs = [s for s in entries if s > g.cursor][:count]
                g.cursor = max(seqs, default=g.cursor)
            for s in seqs:
                old = g.pending.get(s)
                g.pending[s] = _Pending(consumer, (old.deliveries if old else 0) + 1, now)
            return self._decode_all(stream, group, g, seqs, expected)

    def _own_pending(self, g: _Group, who: tuple[str, str, str], count: int) -> list[int]:
        start = self._own.setdefault(who, 0)
        if start is None:
            return []
        mine = sorted(s for s, p in g.pending.items() if p.consumer == who[2] and s > start)
        seqs = mine[:count]
        self._own[who] = seqs[-1] if len(seqs) == count else None
        return seqs

    def _may_claim(self, who: tuple[str, str, str], now: float) -> bool:
        if now - self._last_claim.get(who, -1e18) < self.settings.claim_interval_s:
            return False
        self._last_claim[who] = now
        return True

    def _decode_all(self, stream, group, g: _Group, seqs, expected) -> list[Delivery]:
        cls = expected or STREAM_MESSAGES[stream]
        out = []
        for s in seqs:
            fields = self.streams[stream].get(s)
            deliveries = g.pending[s].deliveries
            if fields is None:  # trimmed by the length cap while pending
                g.pending.pop(s)
                continue
            if deliveries > self.settings.max_deliveries:
                reason = f"delivered {deliveries} times (max {self.settings.max_deliveries})"
                if (stream, s) in self.broker.errors:
                    reason += f"; last error: {self.broker.errors.pop((stream, s))}"
                try:
                    msg = decode(fields, cls)
                except DecodeError:
                    msg = None
                self._dead_letter(stream, group, s, fields, reason, ack=True, msg=msg)
                continue
            try:
                msg = decode(fields, cls)
            except DecodeError as exc:
                self._dead_letter(stream, group, s, fields, str(exc), ack=True)
                continue
            out.append(Delivery(stream, group, f"{s}-0", msg, deliveries))
        return out

    def _dead_letter(self, stream, group, seq: int, fields, reason: str, ack: bool, msg=None):
        """As ``RedisBus.dead_letter``: nothing when the entry is no longer pending."""
        if ack and self.broker.groups[(stream, group)].pending.pop(seq, None) is None:
            return
        self.dead.append(dead_letter_record(stream, group, f"{seq}-0", fields, reason))
        stats = self.broker.counters.setdefault(STATS, {})
        stats[f"dead.{stream}"] = stats.get(f"dead.{stream}", 0) + 1
        prompt = dead_prompt(self.run_id, stream, msg)
        account = self.broker.counters.setdefault(ACCOUNT, {})
        dispatched = account.get("dispatched", 0)
        if prompt is not None and ("dead", prompt) not in self.broker.seen:
            if int(prompt.rsplit("-", 1)[1]) < dispatched:
                self.broker.seen.add(("dead", prompt))
                account["dead"] = account.get("dead", 0) + 1

    def reject(self, delivery: Delivery, reason: str) -> None:
        with self._lock:
            seq = id_tuple(delivery.entry_id)[0]
            fields = self.streams.get(delivery.stream, {}).get(seq, {})
            self._dead_letter(
                delivery.stream, delivery.group, seq, fields, reason, True, delivery.message
            )

    def touch(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            now = self.clock()
            for d in deliveries:
                g = self.broker.groups.get((d.stream, d.group))
                p = g.pending.get(id_tuple(d.entry_id)[0]) if g is not None else None
                if p is not None and (d.stream, d.group, p.consumer) in self._own:
                    p.delivered_at = now

    def ack(self, delivery: Delivery) -> None:
        self.ack_many([delivery])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                g = self.broker.groups.get((d.stream, d.group))
                if g is not None:
                    g.pending.pop(id_tuple(d.entry_id)[0], None)

    def nack(self, delivery: Delivery, reason: str) -> None:
        with self._lock:
            self.broker.errors[(delivery.stream, id_tuple(delivery.entry_id)[0])] = reason[:2000]
            for who in self._own:  # redeliver: the pending lists are read again
                if who[:2] == (delivery.stream, delivery.group):
                    self._own[who] = 0

    # -- broadcast streams, counters, lag ----------------------------------------
    def read(self, stream: str, after: str = "0-0") -> tuple[str, list[Message]]:
        with self._lock:
            start = id_tuple(after)[0]
            out: list[Message] = []
            for s, fields in list(self.streams.get(stream, {}).items()):
                if s <= start:
                    continue
                after = f"{s}-0"
                try:
                    out.append(decode(fields, STREAM_MESSAGES[stream]))
                except DecodeError as exc:
                    self._dead_letter(stream, "", s, fields, str(exc), ack=False)
            return after, out

    def counters(self, counter: str) -> dict[str, int]:
        with self._lock:
            return dict(self.broker.counters.get(counter, {}))

    def dead_count(self, stream: str | None = None) -> int:
        stats = self.counters(STATS)
        if stream is not None:
            return stats.get(f"dead.{stream}", 0)
        return sum(v for k, v in stats.items() if k.startswith("dead."))

    def lag(self, stream: str) -> dict[str, GroupLag]:
        with self._lock:
            entries = self.streams.get(stream, {})
            return {
                group: GroupLag(len(g.pending), sum(1 for s in entries if s > g.cursor))
                for (st, group), g in self.broker.groups.items()
                if st == stream
            }

    def length(self, stream: str) -> int:
        return len(self.streams.get(stream, {}))


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()
