"""Rule-based answer verification: +1 for a correct final answer, -1 otherwise.

Three modes share one entry point, :func:`verify`:

- ``dapo``: the DAPO reference scorer (verl ``math_dapo``). Only the last
  :data:`TAIL_CHARS` characters of the response count; the last
  ``Answer: ...`` match gives the prediction; prediction and ground truth are
  normalised (:func:`normalize_final_answer`) and compared as strings.
- ``boxed``: the same window and normalisation, but the prediction is the
  inside of the last balanced ``\\boxed{...}``.
- ``math_verify``: the candidate is taken like ``dapo`` (the ``Answer:`` line,
  else the last ``\\boxed{}``); if the normalised strings already agree it is
  correct, otherwise Math-Verify decides symbolic equivalence
  (``\\frac{1}{2}`` = ``0.5``, ``2\\sqrt{2}`` = ``\\sqrt{8}``).

Time bound. The string modes are linear in the input (the response is cut to
300 characters first; the normalisation is written as forward scans), so they
need no clock. Math-Verify runs sympy, which can take unbounded time on a
hostile expression. Its own timeouts use ``signal.alarm`` with whole seconds
and only work in the main thread, and no signal interrupts C code that never
checks for one. So the comparison runs in a dedicated worker process, a plain
child interpreter started lazily (not ``multiprocessing``, whose spawn would
re-import the caller's ``__main__``). Inside it a real-time interval timer
raises at ``timeout_s``; the parent waits ``timeout_s`` plus a small grace and,
if no reply came, kills the worker (a fresh one starts on the next call).
Either way the verdict is ``score=-1, reason="timeout"``. This works from any
thread; concurrent callers are served one at a time by the single worker.
"""

from __future__ import annotations

import atexit
import logging
import math
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from dapo.reward.normalize import (
    extract_answer_line,
    last_boxed_content,
    normalize_final_answer,
)
from proto.vocab import REWARD_MODES, RewardMode

TAIL_CHARS = 300
"""Characters at the end of the response that the scorer looks at (as in the reference)."""

Reason = Literal["ok", "no_answer", "mismatch", "timeout", "error"]

_KILL_GRACE_S = 0.5
"""Extra wait beyond ``timeout_s`` before the parent kills a worker that did not answer."""
_STARTUP_TIMEOUT_S = 120.0
"""Bound on starting the worker (spawn + importing sympy); not charged to a verification."""


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verification.

    score: +1.0 if correct else -1.0 (no overlong penalty here).
    acc: True iff correct.
    pred: the prediction as compared (normalised in ``dapo``/``boxed``, the raw
        candidate in ``math_verify``); empty when no answer was found.
    reason: "ok", "no_answer", "mismatch", "timeout" or "error".
    """

    score: float
    acc: bool
    pred: str
    reason: Reason


def _verdict(correct: bool, pred: str) -> Verdict:
    if correct:
        return Verdict(1.0, True, pred, "ok")
    return Verdict(-1.0, False, pred, "mismatch")


def _fail(pred: str, reason: Reason) -> Verdict:
    return Verdict(-1.0, False, pred, reason)


def verify_dapo(response: str, ground_truth: str) -> Verdict:
    """DAPO reference scoring: last ``Answer:`` line within the last 300 characters."""
    raw = extract_answer_line(response[-TAIL_CHARS:])
    if raw is None:
        return _fail("", "no_answer")
    pred = normalize_final_answer(raw)
    return _verdict(pred == normalize_final_answer(ground_truth), pred)


def verify_boxed(response: str, ground_truth: str) -> Verdict:
    """Strict boxed scoring: last balanced ``\\boxed{}`` within the last 300 characters."""
    raw = last_boxed_content(response[-TAIL_CHARS:])
    if raw is None:
        return _fail("", "no_answer")
    pred = normalize_final_answer(raw)
    return _verdict(pred == normalize_final_answer(ground_truth), pred)


# ---------------------------------------------------------------- worker process


class _Deadline(BaseException):
    """Raised by the worker's timer; a BaseException so library ``except Exception`` lets it through."""


def _raise_deadline(signum: int, frame: Any) -> None:
    raise _Deadline


def _call_with_timer(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
    """Run ``fn(*args)`` under a real-time timer; ("ok", value) | ("timeout", None) | ("error", name)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return ("ok", value)
    except _Deadline:
        return ("timeout", None)
    except Exception as exc:  # noqa: BLE001 - the type is reported; str() of sympy objects can hang
        return ("error", type(exc).__name__)


def _worker_main(fd: int) -> None:
    """Body of the worker process: answer (fn, args, timeout_s) requests until EOF or None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGALRM, _raise_deadline)
    # Library timeouts are disabled (they would reset our timer); silence its notice about that.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401 - pay the sympy import before announcing readiness

    conn = Connection(fd)
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        fn, args, timeout_s = request
        conn.send(_call_with_timer(fn, args, timeout_s))


# A plain interpreter, not multiprocessing: spawn/forkserver would re-import the
# caller's __main__, which breaks unguarded scripts; fork would copy threads and sockets.
_WORKER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from dapo.reward.verify import _worker_main; _worker_main(int(sys.argv[2]))"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class _DeadlineWorker:
    """One lazily started worker process that runs calls under a hard deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.started = 0
        """Processes started so far (a kill after a hard timeout makes the next call start one)."""

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, _PACKAGE_ROOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self.started += 1
        if not self._conn.poll(_STARTUP_TIMEOUT_S):
            self._kill()
            raise RuntimeError(f"math_verify worker did not start within {_STARTUP_TIMEOUT_S} s")
        try:
            self._conn.recv()
        except EOFError:
            self._kill()
            raise RuntimeError("math_verify worker exited during start-up") from None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def call(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
        """``fn`` must be a module-level (picklable) function; see :func:`_call_with_timer`."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            assert self._conn is not None
            self._conn.send((fn, args, timeout_s))
            if self._conn.poll(timeout_s + _KILL_GRACE_S):
                try:
                    return self._conn.recv()
                except EOFError:
                    self._kill()
                    return ("error", "worker exited")
            # Stuck where no signal reaches (e.g. C-level big integers): end it.
            self._kill()
            return ("timeout", None)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._conn is not None and self._proc.poll() is None:
                try:
                    self._conn.send(None)
                    self._proc.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()


_WORKER = _DeadlineWorker()
atexit.register(_WORKER.close)


def shutdown_math_verify_worker() -> None:
    """Stop the math_verify worker process if one runs (a later call starts a new one)."""
    _WORKER.close()


def _as_math(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so Math-Verify's LaTeX extractor sees it."""
    return "$" + text.strip().strip("$").strip() + "$"


def math_verify_equal(ground_truth: str, candidate: str) -> bool:
    """Symbolic equivalence by Math-Verify, with its own (signal) timeouts off.

    Only safe to call directly where some other bound exists; :func:`verify`
    runs it in the worker process.
    """
    from math_verify import parse
    from math_verify import verify as mv_verify

    gold = parse(_as_math(ground_truth), parsing_timeout=None)
    pred = parse(_as_math(candidate), parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(mv_verify(gold, pred, timeout_seconds=None))


def verify_math_verify(response: str, ground_truth: str, timeout_s: float = 2.0) -> Verdict:
    """Answer line (else last box) in the last 300 characters, compared symbolically."""
    tail = response[-TAIL_CHARS:]
    raw = extract_answer_line(tail)
    if raw is None:
        raw = last_boxed_content(tail)
    if raw is None:
        return _fail("", "no_answer")
    pred = raw.strip()
    if normalize_final_answer(raw) == normalize_final_answer(ground_truth):
        return _verdict(True, pred)
    status, value = _WORKER.call(math_verify_equal, (ground_truth, raw), timeout_s)
    if status == "ok":
        return _verdict(bool(value), pred)
    return _fail(pred, "timeout" if status == "timeout" else "error")


def verify(
    response: str, ground_truth: str, mode: RewardMode = "dapo", timeout_s: float = 2.0
) -> Verdict:
    """Score one response against its ground truth; see the module doc for the modes.

    Raises TypeError / ValueError for a non-string input, an unknown mode or a
    non-positive ``timeout_s``; never hangs beyond about ``timeout_s`` + 0.5 s
    (plus a one-off worker start in ``math_verify`` mode).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if mode == "dapo":
        return verify_dapo(response, ground_truth)
    if mode == "boxed":
        return verify_boxed(response, ground_truth)
    if mode == "math_verify":
        return verify_math_verify(response, ground_truth, timeout_s)
    raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
