"""A lease in Redis: one holder at a time for a role of a run (the learner), with fencing.

A holder takes the lease with ``SET NX PX`` under a fencing value ``<epoch>:<holder>``
(the epoch from ``INCR``, so every taking is distinct), renews it from a thread every
third of its time to live, and gives it back when done. A second candidate waits while
the lease is held and takes it when it expires (its holder died) or is released.

Waiting and renewing are not enough on their own: a holder that stalls longer than the
time to live (a long pause, a partition) wakes up believing it still holds the lease.
So every write the holder makes to Redis is *fenced*: ``RedisBus`` and ``RunStore`` take
a ``fence`` (key, value) and WATCH that key in the same transaction as the write, which
aborts with ``FencedOut`` when the lease has moved on. A fenced-out learner stops; it
never acknowledges, announces or records anything after losing the lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from dapo.transport.bus import Fence

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """``with Lease(client, key, holder).hold(stop):`` the role is this process's until the
    block ends (or ``lost`` is set: the renewal failed)."""

    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float = 30.0) -> None:
        self.client, self.key, self.holder, self.ttl_ms = client, key, holder, int(ttl_s * 1000)
        self.value: bytes | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def fence(self) -> Fence:
        if self.value is None:
            raise RuntimeError("the lease is not held")
        return self.key, self.value

    def acquire(self, stop: Callable[[], bool], poll_s: float = 1.0) -> Fence:
        """Take the lease, waiting while someone else holds it (logged once); ``stop``
        aborts the wait (returns only with the lease held)."""
        told = False
        while not stop():
            epoch = self.client.incr(f"{self.key}:epoch")
            value = f"{epoch}:{self.holder}".encode()
            if self.client.set(self.key, value, nx=True, px=self.ttl_ms):
                self.value = value
                threading.Thread(target=self._keep, name="lease", daemon=True).start()
                log.info("lease %s taken (%s)", self.key, value.decode())
                return self.fence
            if not told:
                owner = self.client.get(self.key)
                log.warning("lease %s is held by %s: waiting for it", self.key, owner)
                told = True
            time.sleep(poll_s)
        raise SystemExit(0)

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self._renew(keys=[self.key], args=[self.value, self.ttl_ms]):
                    log.error("lease %s lost: another process holds it now", self.key)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # keep trying: the fence guards the writes
                log.warning("lease %s not renewed: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self.value is not None and not self.lost.is_set():
            try:
                self._release(keys=[self.key], args=[self.value])
            except redis.RedisError as exc:  # it expires on its own
                log.warning("lease %s not released: %s", self.key, exc)
