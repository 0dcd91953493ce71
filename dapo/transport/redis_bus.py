"""``RedisBus``: the ``Bus`` contract (``dapo.transport.bus``) over Redis streams.

Consumer groups with XREADGROUP; reclaiming with XAUTOCLAIM; every commit is one
MULTI/EXEC transaction whose idempotency keys are WATCHed; trimming with XTRIM
MINID below the oldest entry some group still needs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis

from dapo.transport.bus import (
    HOLDER,
    STATS,
    BusSettings,
    Delivery,
    Fence,
    FencedOut,
    GroupLag,
    M,
    check_entry_size,
    check_fence,
    id_tuple,
)
from dapo.transport.redis_dead import RedisDeadLetters
from proto.codec import DecodeError, decode, encode
from proto.keys import check_run_id, run_key
from proto.messages import STREAM_MESSAGES, Message

log = logging.getLogger(__name__)


@dataclass
class _ConsumerState:
    own_from: str | None = "0"
    """Entry id after which the re-read of this consumer's own pending entries goes on
    (None: done). It moves past what was handed out, so an entry held unacknowledged on
    purpose (a batch until its checkpoint) is not handed out twice."""
    last_claim: float = 0.0


@dataclass
class RedisBus(RedisDeadLetters):
    """``Bus`` over Redis streams (see the module docstring for the guarantees)."""

    client: redis.Redis
    run_id: str
    settings: BusSettings = field(default_factory=BusSettings)
    fence: Fence | None = None
    """When set, every write of this client is fenced by a lease (``dapo.runtime.lease``)."""
    _groups: set = field(default_factory=set, init=False, repr=False)
    _consumers: dict = field(default_factory=dict, init=False, repr=False)
    _published: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    # -- names -------------------------------------------------------------
    def key(self, stream: str) -> str:
        return run_key(self.run_id, stream)

    @property
    def dead_key(self) -> str:
        return run_key(self.run_id, "dead")

    def counter_key(self, counter: str) -> str:
        return run_key(self.run_id, counter)

    def _dedupe(self, stream: str, dedupe_key: str | None) -> str:
        return "" if dedupe_key is None else run_key(self.run_id, "seen", stream, dedupe_key)

    # -- publish -------------------------------------------------------------
    def _queue(self, pipe, fresh: bool, item: tuple, dedupe: str, fields) -> None:
        """Queue one commit's commands on a MULTI pipeline (``fresh``: key not seen before)."""
        stream, msg, _, ack, counters, counter, hold, holder = item
        if msg is not None and fresh:
            if dedupe:
                pipe.set(dedupe, 1, ex=self.settings.dedupe_ttl_s)
            pipe.xadd(self.key(stream), fields, maxlen=self.settings.maxlen, approximate=True)
        if ack:
            pipe.xack(self.key(ack[0].stream), ack[0].group, *(d.entry_id for d in ack))
        if hold:  # JUSTID: a move, not a delivery (the delivery count stays)
            pipe.xclaim(self.key(hold[0].stream), hold[0].group, holder, 0,
                        [d.entry_id for d in hold], justid=True)  # fmt: skip
        if fresh:
            for name, delta in (counters or {}).items():
                pipe.hincrby(self.counter_key(counter), name, int(delta))

    def _encode_all(self, items: list[tuple]) -> list:
        """Each commit's encoded entry (None without a message), refused when too large."""
        out = []
        for st, m, _, ack, _, _, hold, _ in items:
            for sources in (ack, hold):
                if sources and len({(d.stream, d.group) for d in sources}) != 1:
                    raise ValueError(
                        "a commit acknowledges (holds) entries of one stream and group"
                    )
            fields = encode(m) if m is not None else None
            if fields is not None:
                check_entry_size(st, m, fields, self.settings.max_entry_bytes)
            out.append(fields)
        return out

    def _transaction(self, items: list[tuple]) -> list[str | None]:
        """Run commits ``(stream, msg, dedupe_key, ack, counters, counter, hold, holder)`` as
        one MULTI/EXEC. Idempotency keys are WATCHed: a concurrent publisher of the same key
        makes EXEC fail, and the retry then sees the key and publishes nothing."""
        encoded = self._encode_all(items)
        dedupes = [
            self._dedupe(it[0], it[2]) if it[1] is not None and it[2] is not None else ""
            for it in items
        ]
        watched = [d for d in dedupes if d]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    seen = set()
                    if self.fence is not None:
                        pipe.watch(self.fence[0])
                        check_fence(pipe, self.fence)
                    if watched:
                        pipe.watch(*watched)
                        # immediate mode between WATCH and MULTI: one round trip for all keys
                        hits = pipe.mget(watched)
                        seen = {d for d, hit in zip(watched, hits, strict=True) if hit}
                    pipe.multi()
                    marks = []
                    for item, d, fields in zip(items, dedupes, encoded, strict=True):
                        fresh = not (d and d in seen)
                        before = len(pipe.command_stack)
                        self._queue(pipe, fresh, item, d, fields)
                        xadd_at = (
                            before + (1 if d else 0) if item[1] is not None and fresh else None
                        )
                        marks.append(xadd_at)
                    results = pipe.execute()
                    break
                except redis.WatchError:
                    continue
        out = []
        for (st, *_), at in zip(items, marks, strict=True):
            out.append(_s(results[at]) if at is not None else None)
            if at is not None:
                self._maybe_trim(st)
        return out

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
        item = (stream, msg, dedupe_key, list(ack), counters, counter, list(hold), holder)
        return self._transaction([item])[0]

    def publish_many(
        self,
        stream: str,
        msgs: Sequence[Message],
        dedupe_keys: Sequence[str | None] | None = None,
        acks: Sequence[Delivery | None] | None = None,
    ) -> list[str | None]:
        """Several publish(+ack) commits in one round trip, all in one transaction."""
        dedupe_keys = dedupe_keys or [None] * len(msgs)
        acks = acks or [None] * len(msgs)
        items = [
            (stream, m, k, [d] if d is not None else [], None, STATS, [], HOLDER)
            for m, k, d in zip(msgs, dedupe_keys, acks, strict=True)
        ]
        return self._transaction(items) if items else []

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """All of ``deliveries`` in one transaction (a batch and its held groups go together);
        fenced like every write of a fenced client."""
        by_source: dict[tuple[str, str], list[Delivery]] = {}
        for d in deliveries:
            by_source.setdefault((d.stream, d.group), []).append(d)
        items = [(None, None, None, acks, None, STATS, [], HOLDER) for acks in by_source.values()]
        if items:
            self._transaction(items)

    def fetch(
        self, stream: str, entry_ids: Sequence[str], expected: type[M] | None = None
    ) -> list[M | None]:
        """One pipelined XRANGE per id (no transaction: a read)."""
        cls = expected or STREAM_MESSAGES[stream]
        with self.client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xrange(self.key(stream), min=entry_id, max=entry_id)
            replies = pipe.execute()
        out: list[M | None] = []
        for entry_id, reply in zip(entry_ids, replies, strict=True):
            msg = None
            if reply:
                try:
                    msg = decode(reply[0][1], cls)
                except DecodeError as exc:
                    log.error("%s entry %s cannot be read: %s", stream, entry_id, exc)
            out.append(msg)
        return out

    def publish(self, stream: str, msg: Message, *, dedupe_key: str | None = None) -> str | None:
        """Append ``msg``; returns its entry id, or None if ``dedupe_key`` was seen before."""
        return self.commit(stream=stream, msg=msg, dedupe_key=dedupe_key)

    def ack(self, delivery: Delivery) -> None:
        self.ack_many([delivery])

    def nack(self, delivery: Delivery, reason: str) -> None:
        """Processing failed: keep the entry pending for redelivery (dead-lettered after N)."""
        self.client.hset(run_key(self.run_id, "last_error"), delivery.entry_id, reason[:2000])
        for (stream, group, _), state in self._consumers.items():
            if stream == delivery.stream and group == delivery.group:
                state.own_from = "0"

    # -- consume -------------------------------------------------------------
    def ensure_group(self, stream: str, group: str) -> None:
        if (stream, group) in self._groups:
            return
        try:
            self.client.xgroup_create(self.key(stream), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((stream, group))

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
        """Up to ``count`` decoded deliveries: own pending, then reclaimed, then new.

        A single consumer that deliberately holds entries unacknowledged (the
        sampler's surplus, the learner's batches until a checkpoint) passes
        ``reclaim=False`` so it does not take its own held entries back.
        """
        self.ensure_group(stream, group)
        key = self.key(stream)
        state = self._consumers.setdefault((stream, group, consumer), _ConsumerState())
        raw: list = []
        if state.own_from is not None:
            own = self._entries(
                self._read_group(group, consumer, key, state.own_from, count),
                keep_deleted=True,
            )
            state.own_from = _s(own[-1][0]) if len(own) == count else None
            raw = [e for e in own if e[1]]
        now = time.monotonic()
        if reclaim and not raw and now - state.last_claim >= self.settings.claim_interval_s:
            state.last_claim = now
            claimed = self.client.xautoclaim(
                key, group, consumer, self.settings.claim_idle_ms, start_id="0-0", count=count
            )
            raw = [e for e in claimed[1] if e[1]]
            if raw:
                log.warning("reclaimed %d idle entries of %s/%s", len(raw), stream, group)
        redelivered = bool(raw)
        if not raw:
            raw = self._entries(self._read_group(group, consumer, key, ">", count, block_ms))
        counts = self._delivery_counts(key, group, consumer, raw) if redelivered else {}
        return self._decode_all(stream, group, raw, counts, expected)

    def _read_group(self, group, consumer, key, start, count, block_ms=None):
        """XREADGROUP; for a fenced client only while the lease is still ours, checked in the
        same atomic step (a script cannot block, so ``block_ms`` is waited out by polling).
        Without it a learner that lost its lease could still take a batch into the pending
        list that its successor, reading as the same consumer, has already re-read."""
        if self.fence is None:
            return self.client.xreadgroup(group, consumer, {key: start}, count=count,
                                          block=block_ms)  # fmt: skip
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while True:
            try:
                resp = self.client.eval(_FENCED_READ, 2, key, self.fence[0], self.fence[1],
                                        group, consumer, count, start)  # fmt: skip
            except redis.ResponseError as exc:
                if "FENCED" in str(exc):
                    raise FencedOut(f"lease {self.fence[0]} is no longer held") from None
                raise
            entries = [(e[0], _pairs(e[1])) for _, batch in resp or [] for e in batch]
            if entries or time.monotonic() >= deadline:
                return [[key, entries]] if entries else []
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))

    @staticmethod
    def _entries(resp, keep_deleted: bool = False) -> list:
        """(id, fields) pairs of an XREADGROUP reply; a pending entry trimmed away comes back
        with no fields and is dropped unless ``keep_deleted``."""
        if not resp:
            return []
        if isinstance(resp, dict):  # RESP3
            entries = [e for batch in resp.values() for e in batch[0]]
        else:
            entries = [e for _, batch in resp for e in batch]
        return entries if keep_deleted else [e for e in entries if e[1]]

    def _delivery_counts(self, key: str, group: str, consumer: str, raw: list) -> dict[bytes, int]:
        ids = sorted((e[0] for e in raw), key=id_tuple)
        rows = self.client.xpending_range(
            key, group, min=ids[0], max=ids[-1], count=2 * len(ids) + 16, consumername=consumer
        )
        return {_b(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _decode_all(self, stream, group, raw, counts, expected) -> list[Delivery]:
        cls = expected or STREAM_MESSAGES[stream]
        out = []
        for entry_id, fields in raw:
            deliveries = counts.get(_b(entry_id), 1)
            if deliveries > self.settings.max_deliveries:
                last = self.client.hget(run_key(self.run_id, "last_error"), _s(entry_id))
                reason = f"delivered {deliveries} times (max {self.settings.max_deliveries})"
                if last:
                    reason += f"; last error: {_s(last)}"
                self.dead_letter(stream, group, entry_id, fields, reason, _try_decode(fields, cls))
                continue
            try:
                msg = decode(fields, cls)
            except DecodeError as exc:
                self.dead_letter(stream, group, entry_id, fields, str(exc))
                continue
            out.append(Delivery(stream, group, _s(entry_id), msg, deliveries))
        return out

    def read(self, stream: str, after: str = "0-0") -> tuple[str, list[Message]]:
        """Entries of a broadcast stream after ``after``, and the id to read after next time.
        An undecodable entry is copied to the dead letters (the stream has no group to
        acknowledge it in) and skipped."""
        start = "-" if after == "0-0" else f"({after}"
        out: list[Message] = []
        for raw_id, fields in self.client.xrange(self.key(stream), min=start):
            after = _s(raw_id)
            try:
                out.append(decode(fields, STREAM_MESSAGES[stream]))
            except DecodeError as exc:
                log.error("skipping %s entry %s: %s", stream, after, exc)
                self.dead_letter(stream, "", raw_id, fields, str(exc))
        return after, out

    def counters(self, counter: str) -> dict[str, int]:
        return {_s(k): int(v) for k, v in self.client.hgetall(self.counter_key(counter)).items()}

    def dead_count(self, stream: str | None = None) -> int:
        if stream is not None:
            return int(self.client.hget(self.counter_key(STATS), f"dead.{stream}") or 0)
        stats = self.counters(STATS)
        return sum(v for k, v in stats.items() if k.startswith("dead."))

    # -- lag and trimming ------------------------------------------------------
    def lag(self, stream: str) -> dict[str, GroupLag]:
        """Per consumer group: pending (unacked) and lag (undelivered) entries."""
        try:
            groups = self.client.xinfo_groups(self.key(stream))
        except redis.ResponseError:  # stream does not exist yet
            return {}
        return {
            _s(g["name"]): GroupLag(
                int(g["pending"]), -1 if g.get("lag") is None else int(g["lag"])
            )
            for g in groups
        }

    def length(self, stream: str) -> int:
        return int(self.client.xlen(self.key(stream)))

    def _maybe_trim(self, stream: str) -> None:
        n = self._published.get(stream, 0) + 1
        self._published[stream] = n
        if n % self.settings.trim_every == 0:
            self.trim(stream)

    def trim(self, stream: str) -> int:
        """Drop entries every consumer group has acknowledged; returns how many went."""
        key = self.key(stream)
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError:
            return 0
        if not groups:
            return 0  # nobody consumes yet: everything is still needed
        floor = None
        for g in groups:
            # Other consumers ack concurrently: XINFO's pending count may be stale by the
            # time XPENDING runs, whose summary is then empty (min None). Entries delivered
            # after XINFO are pending in that summary, so falling back to the (older)
            # last-delivered id never drops an entry someone still needs.
            ms, seq = id_tuple(g["last-delivered-id"])
            need = (ms, seq + 1)
            if int(g["pending"]):
                oldest = self.client.xpending(key, g["name"]).get("min")
                if oldest is not None:
                    need = min(need, id_tuple(oldest))
            floor = need if floor is None else min(floor, need)
        return int(self.client.xtrim(key, minid=f"{floor[0]}-{floor[1]}"))


_FENCED_READ = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease moved on')
end
return redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                  'STREAMS', KEYS[1], ARGV[5])
"""
"""A fenced XREADGROUP: KEYS stream, lease; ARGV lease value, group, consumer, count, id."""


def _pairs(flat) -> dict:
    """[f1, v1, f2, v2, ...] (a script's reply) -> {f1: v1, ...}; a deleted entry's None
    stays None, as XREADGROUP reports it."""
    if flat is None:
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _try_decode(fields, cls) -> Message | None:
    try:
        return decode(fields, cls)
    except DecodeError:
        return None


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


SOCKET_TIMEOUT_S = 30.0
"""How long a client waits for any reply. Every blocking command we send (XREADGROUP BLOCK,
BLPOP) blocks for at most a few seconds, so a reply later than this means Redis is gone,
not busy. (redis-py's own default is 5 s, which a loaded host can exceed.)"""


def connect(
    url: str, password: str | None = None, username: str | None = None, tls_ca=None
) -> redis.Redis:
    """A client for ``url`` with health checks; bytes in, bytes out. ``password`` (and an ACL
    ``username``) log in without the secret in the URL, which process listings and pod specs
    show. ``rediss://`` always verifies the server's certificate and name, against ``tls_ca``
    when given: Redis holds the addresses workers connect to, so it must prove who it is."""
    login = {"password": password, "username": username or None} if password is not None else {}
    if url.startswith("rediss://"):
        tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        login |= tls | ({"ssl_ca_certs": os.fspath(tls_ca)} if tls_ca is not None else {})
    elif tls_ca is not None:
        raise ValueError(f"a TLS CA is given but {url.split(':', 1)[0]}:// is not rediss://")
    return redis.Redis.from_url(
        url,
        health_check_interval=30,
        socket_keepalive=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=10.0,
        **login,
    )
