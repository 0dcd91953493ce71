"""Dead letters and keep-alive of ``RedisBus`` (``dapo.transport.redis_bus``): moving an
entry aside atomically, rejecting a decoded delivery, and touching entries still in work."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dapo.transport.bus import (
    ACCOUNT,
    STATS,
    Delivery,
    dead_letter_record,
    dead_prompt,
    id_tuple,
)
from proto.keys import run_key
from proto.messages import Message

log = logging.getLogger("dapo.transport.redis_bus")

# One dead letter, atomically: acknowledge the entry in its group (when it has one) and, only
# if that acknowledgement took it off the pending list, copy it to the dead letters and count
# it; the account counts a prompt once (idempotency key), and only one the sampler has
# dispatched (its sequence number below ``dispatched``). Two consumers dead-lettering the
# same entry at once (one reclaimed it) thus add one record, not two.
# KEYS: dead, source stream, stats, last_error, account, seen key ("" = not a prompt)
# ARGV: group ("" = broadcast stream), entry id, stats field, ttl, maxlen, prompt seq,
#       record k/v...
_DEAD_LETTER = """
if ARGV[1] ~= '' and redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 7))
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('HDEL', KEYS[4], ARGV[2])
if KEYS[6] ~= '' then
  local dispatched = tonumber(redis.call('HGET', KEYS[5], 'dispatched') or '0')
  if tonumber(ARGV[6]) < dispatched and redis.call('SET', KEYS[6], 1, 'NX', 'EX', ARGV[4]) then
    redis.call('HINCRBY', KEYS[5], 'dead', 1)
  end
end
return 1
"""


class RedisDeadLetters:
    """What ``RedisBus`` does with entries that cannot go on (it provides ``client``,
    ``run_id``, ``settings``, ``key``, ``dead_key``, ``counter_key``, ``_dedupe`` and
    ``_consumers``)."""

    def dead_letter(
        self, stream: str, group: str, entry_id, fields, reason: str, msg: Message | None = None
    ) -> bool:
        """Move an entry to the dead-letter stream (original fields kept), ack it and count it
        (``msg``: what it decoded to, if it did: a prompt of the run is counted in the
        account too). False when another consumer dead-lettered or acknowledged it first."""
        entry = _s(entry_id)
        log.error("dead-lettering %s entry %s: %s", stream, entry, reason[:500])
        record = dead_letter_record(stream, group, entry, fields, reason)
        prompt = dead_prompt(self.run_id, stream, msg)
        seen = self._dedupe("dead", prompt) if prompt else ""
        keys = [self.dead_key, self.key(stream), self.counter_key(STATS),
                run_key(self.run_id, "last_error"), self.counter_key(ACCOUNT), seen]  # fmt: skip
        seq = int(prompt.rsplit("-", 1)[1]) if prompt else -1
        args = [group, entry, f"dead.{stream}", self.settings.dedupe_ttl_s, self.settings.maxlen,
                seq]  # fmt: skip
        args += [x for kv in record.items() for x in kv]
        return bool(self.client.eval(_DEAD_LETTER, len(keys), *keys, *args))

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a decoded delivery whose handling failed (``Bus.reject``)."""
        rows = self.client.xrange(self.key(delivery.stream), delivery.entry_id, delivery.entry_id)
        fields = rows[0][1] if rows else {}
        self.dead_letter(
            delivery.stream, delivery.group, delivery.entry_id, fields, reason, delivery.message
        )

    def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of entries this consumer still works on: XCLAIM ... JUSTID by
        their owner (it neither counts a delivery nor hands anything out). An entry no
        longer pending is not claimed; one taken over meanwhile by another consumer is
        left to it (LASTID-free XCLAIM would steal it back, so ownership is checked first)."""
        by_source: dict[tuple[str, str], list[str]] = {}
        for d in deliveries:
            by_source.setdefault((d.stream, d.group), []).append(d.entry_id)
        for (stream, group), ids in by_source.items():
            key = self.key(stream)
            lo, hi = min(ids, key=id_tuple), max(ids, key=id_tuple)
            owners = {
                _s(r["message_id"]): _s(r["consumer"])
                for r in self.client.xpending_range(key, group, lo, hi, count=2 * len(ids) + 16)
            }
            for consumer in set(owners.values()):
                mine = [i for i in ids if owners.get(i) == consumer]
                if consumer == self._owner(stream, group) and mine:
                    self.client.xclaim(key, group, consumer, 0, mine, justid=True)

    def _owner(self, stream: str, group: str) -> str | None:
        """The consumer name this client reads ``stream`` in ``group`` as."""
        for st, g, consumer in self._consumers:
            if (st, g) == (stream, group):
                return consumer
        return None


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
