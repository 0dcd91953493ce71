"""Double buffering of the learner's broadcasts (``WeightSender.start``).

`InFlight` holds the one version being sent in the background: a snapshot of the weights
in the wire dtype (flat buffers of the sender's layout, allocated at the first `start` and
reused), the thread broadcasting it, and the outcomes not yet collected. The snapshot is
taken on the caller's thread, so a sharded learner's gathers stay in step with its other
ranks; only the transfer (Redis handshake, buckets, checksum) runs on the thread, which
touches nothing the caller changes meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dapo.weights.buckets import FlatBuffers
from dapo.weights.registry import WeightSyncError

if TYPE_CHECKING:
    from dapo.weights.sender import SyncStats, WeightSender
    from dapo.weights.stream import Source


class InFlight:
    """At most one background broadcast of a `WeightSender`, and its outcomes."""

    def __init__(self, sender: WeightSender) -> None:
        self.sender = sender
        self.snapshot: FlatBuffers | None = None
        self._thread: threading.Thread | None = None
        self._outcomes: list[SyncStats | WeightSyncError] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.wait_s = self.snapshot_s = 0.0  # of the last `start`: the two parts of the stall

    def start(self, version: int, source: Source | None) -> float:
        """Waits for the version in flight, snapshots `source` (default: the sender's
        parameters) and starts sending it; the seconds the caller was held."""
        tick = time.perf_counter()
        self.wait()
        self.wait_s = time.perf_counter() - tick
        sender = self.sender
        if self.snapshot is None:
            self.snapshot = FlatBuffers(sender.layout, sender.device)
        source = sender._params if source is None else source
        if isinstance(source, Mapping):
            self.snapshot.pack(source, cast=True)
        else:
            self.snapshot.fill(source)
        self._thread = threading.Thread(
            target=self._run, args=(version,), name="weights-sender", daemon=True
        )
        self._thread.start()
        held = time.perf_counter() - tick
        self.snapshot_s = held - self.wait_s
        return held

    def _run(self, version: int) -> None:
        try:
            outcome = self.sender._broadcast(version, {}, self.snapshot)
        except WeightSyncError as error:
            outcome = error
        except BaseException as error:  # handed to the caller by `collect`/`wait`
            with self._lock:
                self._error = error
            return
        with self._lock:
            self._outcomes.append(outcome)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Blocks until no version is in flight (bounded by the sender's timeouts)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def collect(self) -> list[SyncStats | WeightSyncError]:
        """Outcomes completed since the last call; re-raises an unexpected failure."""
        self._raise()
        with self._lock:
            done, self._outcomes = self._outcomes, []
        return done

    def _raise(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error
