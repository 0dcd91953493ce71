"""Streaming buckets: a broadcast that never holds more than a few buckets beyond the model.

The sender and the receiver move the layout's buckets (``dapo.weights.buckets``) one after
another through a small `StagingPool` of reusable byte buffers instead of preallocating
the whole model in the wire dtype:

- sender: `stage_buckets` reads the parameters from a *source*, either a mapping (random
  access: each bucket is filled in layout order) or an iterator of (name, tensor) that
  may produce each tensor only for the moment (a sharded learner gathers one parameter
  at a time, in model order), casting to the layout's dtype (the rollout dtype) as it
  copies. A bucket is handed out once all its slots are filled, in layout order; with a
  single wire dtype the layout keeps model order, so an in-order iterator fills one
  bucket at a time;
- receiver: `receive_buckets` posts the next buckets' broadcasts into free buffers while
  the engine loads the views of the current one.

``buckets.RowDigest`` checksums bucket by bucket, so neither side needs the whole model in
one place to prove what it sent or holds.

Timeouts. Each bucket's broadcast carries its own timeout, `bucket_timeout_s`: a fixed
allowance plus the bucket's bytes at the slowest accepted rate, set on the backend's op
and on the sender's wait for it. At most `depth` buckets are posted at once, so a bucket's
clock never runs while the whole model before it moves (which made one fixed timeout for
buckets all queued at once wrong for large models).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta

import torch

from dapo.weights.buckets import Bucket, BucketLayout, NamedTensors, RowDigest, start_broadcast

Source = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
"""Where a broadcast reads the parameters: by name, or a one-pass stream of pairs."""


def wire_layout(
    named_params: NamedTensors, bucket_mb: float, wire_dtype: torch.dtype | None
) -> BucketLayout:
    """The layout of what travels: floating parameters in `wire_dtype` (None: their own)."""
    specs = [
        (n, tuple(t.shape), wire_dtype if wire_dtype and t.dtype.is_floating_point else t.dtype)
        for n, t in named_params
    ]
    return BucketLayout.from_specs(specs, bucket_mb)


def wire_dtype(setting: str, engine: str, rollout_dtype: str) -> torch.dtype | None:
    """The dtype weights travel in: `setting` unless "auto"; for auto, the run's rollout
    dtype when the engine is vLLM (it computes in it) and None (the learner's own dtype)
    for the HF engine, which computes in the dtype it loaded."""
    if setting != "auto":
        return getattr(torch, setting)
    return getattr(torch, rollout_dtype) if engine == "vllm" else None


def bucket_timeout_s(base_s: float, nbytes: int, min_bandwidth_mb_s: float) -> float:
    """How long one bucket may take on the wire: `base_s` plus its bytes at the slowest
    accepted rate (MiB/s)."""
    return base_s + nbytes / (min_bandwidth_mb_s * (1 << 20))


class StagingPool:
    """Reusable byte buffers, each as large as the layout's biggest bucket; `peak` counts
    the most ever held at once (the memory a broadcast costs beyond the model)."""

    def __init__(self, layout: BucketLayout, device: torch.device) -> None:
        self.layout, self.device = layout, device
        self.capacity = max(b.nbytes for b in layout.buckets)
        self._free: list[torch.Tensor] = []
        self._lent: dict[
            int, torch.Tensor
        ] = {}  # data_ptr -> raw buffer (a dtype view has no _base)
        self.allocated = self.peak = 0

    def acquire(self, bucket: Bucket) -> torch.Tensor:
        """A (numel,) tensor of the bucket's dtype over a free buffer (contents undefined)."""
        if self._free:
            raw = self._free.pop()
        else:
            raw = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
            self.allocated += 1
            self.peak = max(self.peak, self.allocated)
        self._lent[raw.data_ptr()] = raw
        return raw[: bucket.nbytes].view(bucket.dtype)

    def release(self, flat: torch.Tensor) -> None:
        """Gives a buffer from `acquire` back (its views must no longer be in use)."""
        self._free.append(self._lent.pop(flat.data_ptr()))

    @property
    def held(self) -> int:
        """Buffers lent out now."""
        return len(self._lent)

    def nbytes(self) -> int:
        return self.peak * self.capacity


def slot_views(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, view of its slot in `flat`) for the bucket's slots."""
    return [(s.name, flat[s.offset : s.offset + s.numel].view(s.shape)) for s in bucket.slots]


def _fill(bucket: Bucket, flat: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    """Copies (and casts) one parameter into its slot; padding between slots is zeroed."""
    slot = next(s for s in bucket.slots if s.name == name)
    if tuple(tensor.shape) != slot.shape:
        raise ValueError(
            f"parameter {name!r} has shape {tuple(tensor.shape)}, the layout expects {slot.shape}"
        )
    flat[slot.offset : slot.offset + slot.numel].view(slot.shape).copy_(tensor.detach())


def _zeroed(pool: StagingPool, bucket: Bucket) -> torch.Tensor:
    flat = pool.acquire(bucket)
    flat.zero_()  # padding bytes enter the checksum: they must be the same everywhere
    return flat


def stage_buckets(
    layout: BucketLayout, source: Source, pool: StagingPool
) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """The layout's buckets, filled from `source`, in layout order; the caller releases each
    flat buffer to `pool` once done with it. Raises KeyError naming a parameter the source
    lacks or does not belong to the layout."""
    if isinstance(source, Mapping):
        for bucket in layout.buckets:
            flat = _zeroed(pool, bucket)
            for slot in bucket.slots:
                if slot.name not in source:
                    raise KeyError(f"parameter {slot.name!r} of the layout was not given")
                _fill(bucket, flat, slot.name, source[slot.name])
            yield bucket, flat
        return
    yield from _stage_stream(layout, iter(source), pool)


def _stage_stream(
    layout: BucketLayout, pairs: Iterator[tuple[str, torch.Tensor]], pool: StagingPool
) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """Buckets from a one-pass stream: each tensor is copied at once (it may be a temporary
    gather); a bucket is ready when all its slots arrived and goes out in layout order."""
    slots = layout.slots
    open_: dict[int, tuple[torch.Tensor, int]] = {}  # bucket -> (flat, slots still missing)
    ready: dict[int, torch.Tensor] = {}
    seen: set[str] = set()
    next_index = 0
    for name, tensor in pairs:
        if name not in slots or name in seen:
            raise KeyError(f"parameter {name!r} is not in the layout or came twice")
        seen.add(name)
        bucket = layout.buckets[slots[name].bucket]
        flat, missing = open_.get(bucket.index) or (_zeroed(pool, bucket), len(bucket.slots))
        _fill(bucket, flat, name, tensor)
        if missing == 1:
            open_.pop(bucket.index, None)
            ready[bucket.index] = flat
        else:
            open_[bucket.index] = (flat, missing - 1)
        while next_index in ready:
            yield layout.buckets[next_index], ready.pop(next_index)
            next_index += 1
    if next_index != len(layout.buckets):
        absent = sorted(set(slots) - seen)[:5]
        raise KeyError(f"parameters of the layout were not given: {absent}")


def receive_buckets(
    layout: BucketLayout,
    group,
    pool: StagingPool,
    timeout_of: Callable[[Bucket], timedelta],
    digest: RowDigest,
    depth: int = 2,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: (name, view) for every slot, bucket by bucket, while up to `depth`
    buckets are on the wire. A view is valid until the iteration enters the next bucket
    (its buffer then takes a later bucket), so the consumer must copy as it goes.
    Raises RuntimeError (from the backend) when a bucket fails or times out."""
    pending = deque(layout.buckets)
    posted: deque[tuple[Bucket, torch.Tensor, object]] = deque()

    def post() -> None:
        bucket = pending.popleft()
        flat = pool.acquire(bucket)
        timeout = timeout_of(bucket)
        posted.append((bucket, flat, start_broadcast(group, flat.view(torch.uint8), timeout)))

    while pending and len(posted) < depth:
        post()
    while posted:
        bucket, flat, work = posted.popleft()
        work.wait(timeout_of(bucket))
        digest.update(flat)
        yield from slot_views(bucket, flat)
        pool.release(flat)  # the consumer asked for the next bucket: this one is done
        if pending:
            post()


def send_buckets(
    group,
    buckets: Iterator[tuple[Bucket, torch.Tensor, bool]],
    pool: StagingPool,
    timeout_of: Callable[[Bucket], timedelta],
    deadline: float,
    depth: int = 2,
) -> tuple[str, float, float]:
    """Sender side: broadcasts (bucket, flat, staged) from rank 0 of `group` (None: nobody
    to send to, only the checksum), at most `depth` on the wire while the next is filled.
    Each bucket waits at most its own timeout and never past `deadline` (monotonic); a
    staged flat goes back to `pool` once sent. Returns the checksum, the fill time and the
    checksum time; raises RuntimeError (from the backend) when a bucket fails."""
    digest, inflight = RowDigest(), deque()
    fill_s = checksum_s = 0.0

    def finish() -> None:
        bucket, flat, staged, work = inflight.popleft()
        left = max(min(timeout_of(bucket).total_seconds(), deadline - time.monotonic()), 1e-3)
        try:
            work.wait(timedelta(seconds=left))
        except RuntimeError as error:
            raise RuntimeError(
                f"bucket {bucket.index} ({bucket.nbytes} bytes) not sent within {left:.2f} s: "
                f"{error}"
            ) from error
        if staged:
            pool.release(flat)

    while True:
        tick = time.perf_counter()
        item = next(buckets, None)
        fill_s += time.perf_counter() - tick
        if item is None:
            break
        bucket, flat, staged = item
        if group is not None:
            work = start_broadcast(group, flat.view(torch.uint8), timeout_of(bucket))
            inflight.append((bucket, flat, staged, work))
        tick = time.perf_counter()
        digest.update(flat)  # overlaps with the bytes in flight
        checksum_s += time.perf_counter() - tick
        if group is None and staged:
            pool.release(flat)
        while len(inflight) >= depth:
            finish()
    while inflight:
        finish()
    return digest.hexdigest(), fill_s, checksum_s
