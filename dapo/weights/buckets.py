"""Flat buckets: a model's parameters laid out in a few large contiguous buffers.

Weight sync moves parameters as a handful of big transfers instead of one
collective per tensor. `BucketLayout` decides, once and deterministically from
the parameter list, where every tensor lives:

- tensors are grouped by dtype (a flat buffer has a single dtype), the groups
  ordered by the first appearance of their dtype in the parameter list, the
  tensors inside a group kept in list order;
- a group is cut into buckets of at most `bucket_mb` MiB; a tensor larger than
  the cap gets a bucket of its own;
- every slot starts on a 64-byte boundary, and every bucket is padded with
  zeros to a whole number of checksum rows (`ROW_BYTES`).

Both ends build the layout from the same (name, shape, dtype) list, so they
agree byte for byte; `BucketLayout.fingerprint` hashes the complete placement
and is compared during the rendezvous.

`FlatBuffers` owns the preallocated buffers of one layout. Each slot is a view
into its bucket, so the receiver hands those views to the engine without a
copy, and the sender either copies parameters into them (`pack_bucket`) or,
after `adopt`, makes the parameters themselves live in the buffers so packing
has nothing left to copy.

Checksum (`buffer_checksum`): each bucket's raw bytes are read as int64 words
in rows of `ROW_WORDS`; each row is summed modulo 2**64 (integer addition wraps
and is associative, so the result is exact and the same on any device, thread
count or reduction order) and the row sums, one per 8 KiB, are hashed with
blake2b together with the bucket dtypes and sizes. Bit-identical buffers give
identical checksums; any change inside one row that does not cancel out in
the modular sum changes the result. It costs one memory-bandwidth pass.

The last functions build and use process groups outside the default group
(`init_process_group` can run once per process; weight-sync groups come and
go): `make_group` picks NCCL for CUDA buffers and gloo otherwise, so the same
calls serve both.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

ALIGN_BYTES = 64
ROW_WORDS = 1024
ROW_BYTES = ROW_WORDS * 8
MIB = 1 << 20

NamedTensors = Sequence[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lives: `offset`/`numel` in elements of its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer: `numel` elements of `dtype` (padding included)."""

    index: int
    dtype: torch.dtype
    numel: int
    slots: tuple[Slot, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _dtype_groups(
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
) -> dict[torch.dtype, list[tuple[str, tuple[int, ...]]]]:
    """Specs grouped by dtype; dicts keep first-appearance order."""
    groups: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
    seen: set[str] = set()
    for name, shape, dtype in specs:
        if name in seen:
            raise ValueError(f"duplicate parameter name {name!r} in the bucket layout")
        seen.add(name)
        groups.setdefault(dtype, []).append((name, tuple(int(d) for d in shape)))
    return groups


def _fill_buckets(
    dtype: torch.dtype, items: list[tuple[str, tuple[int, ...]]], cap_bytes: int, first: int
) -> list[Bucket]:
    """Cuts one dtype group into capped buckets, numbering them from `first`."""
    itemsize = dtype.itemsize
    align = max(1, ALIGN_BYTES // itemsize)
    row = max(1, ROW_BYTES // itemsize)
    cap = max(1, cap_bytes // itemsize)
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    cursor = 0

    def close() -> None:
        buckets.append(
            Bucket(first + len(buckets), dtype, _round_up(max(cursor, 1), row), tuple(slots))
        )

    for name, shape in items:
        numel = 1
        for dim in shape:
            numel *= dim
        offset = _round_up(cursor, align)
        if slots and offset + numel > cap:
            close()
            slots, offset = [], 0
        slots.append(Slot(name, shape, dtype, first + len(buckets), offset, numel))
        cursor = offset + numel
    close()
    return buckets


@dataclass(frozen=True)
class BucketLayout:
    """Deterministic placement of named tensors in capped, dtype-homogeneous buckets."""

    buckets: tuple[Bucket, ...]
    bucket_mb: float

    @classmethod
    def from_specs(
        cls, specs: Sequence[tuple[str, Sequence[int], torch.dtype]], bucket_mb: float = 64.0
    ) -> BucketLayout:
        """Layout from (name, shape, dtype) triples, in the order the model lists them."""
        if not specs:
            raise ValueError("the bucket layout needs at least one parameter")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        cap_bytes = int(bucket_mb * MIB)
        buckets: list[Bucket] = []
        for dtype, items in _dtype_groups([(n, tuple(s), d) for n, s, d in specs]).items():
            buckets.extend(_fill_buckets(dtype, items, cap_bytes, len(buckets)))
        return cls(tuple(buckets), float(bucket_mb))

    @classmethod
    def from_named(cls, named: NamedTensors, bucket_mb: float = 64.0) -> BucketLayout:
        """Layout from (name, tensor) pairs; only shapes and dtypes are read (meta tensors work)."""
        return cls.from_specs([(n, tuple(t.shape), t.dtype) for n, t in named], bucket_mb)

    @cached_property
    def slots(self) -> dict[str, Slot]:
        return {s.name: s for b in self.buckets for s in b.slots}

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of every slot's name, shape, dtype and placement: equal iff the layouts agree."""
        doc = [
            [str(b.dtype), b.numel, [[s.name, list(s.shape), s.offset] for s in b.slots]]
            for b in self.buckets
        ]
        blob = json.dumps(doc, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) in layout order; `from_specs` of it rebuilds this layout."""
        return [(s.name, s.shape, s.dtype) for b in self.buckets for s in b.slots]

    def to_json(self) -> str:
        specs = [[n, list(shape), str(d).removeprefix("torch.")] for n, shape, d in self.specs()]
        return json.dumps({"bucket_mb": self.bucket_mb, "specs": specs}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BucketLayout:
        doc = json.loads(text)
        specs = [(n, tuple(shape), getattr(torch, d)) for n, shape, d in doc["specs"]]
        return cls.from_specs(specs, doc["bucket_mb"])

    def mismatches(self, named: NamedTensors, limit: int = 5) -> list[str]:
        """How `named` differs from this layout by names and shapes (dtypes may differ)."""
        theirs = {n: tuple(t.shape) for n, t in named}
        ours = {n: s.shape for n, s in self.slots.items()}
        problems = [f"missing {n!r}" for n in ours if n not in theirs]
        problems += [f"unexpected {n!r}" for n in theirs if n not in ours]
        problems += [
            f"{n!r} has shape {theirs[n]}, expected {shape}"
            for n, shape in ours.items()
            if n in theirs and theirs[n] != shape
        ]
        return problems[:limit]

    def summary(self) -> str:
        """Short human description, used in mismatch errors."""
        dtypes = sorted({str(b.dtype).removeprefix("torch.") for b in self.buckets})
        return (
            f"{len(self.slots)} tensors, {self.total_bytes / MIB:.2f} MiB in "
            f"{len(self.buckets)} buckets ({', '.join(dtypes)}), cap {self.bucket_mb:g} MiB"
        )


class FlatBuffers:
    """Preallocated flat buffers of a layout, with per-slot views into them."""

    def __init__(self, layout: BucketLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.tensors = [
            torch.zeros(b.numel, dtype=b.dtype, device=self.device) for b in layout.buckets
        ]
        # uint8 aliases: collectives move bytes, whatever the dtype. (nbytes,)
        self.byte_views = [t.view(torch.uint8) for t in self.tensors]
        self._views = {
            s.name: self.tensors[b.index][s.offset : s.offset + s.numel].view(s.shape)
            for b in layout.buckets
            for s in b.slots
        }

    def views(self) -> list[tuple[str, torch.Tensor]]:
        """(name, view) for every slot, in layout order; views alias the buffers."""
        return [(s.name, self._views[s.name]) for b in self.layout.buckets for s in b.slots]

    def _checked(self, slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"parameter {slot.name!r} is {tuple(tensor.shape)} {tensor.dtype}, the layout "
                f"expects {slot.shape} {slot.dtype}"
            )
        return tensor

    def pack_bucket(
        self, index: int, tensors: Mapping[str, torch.Tensor], cast: bool = False
    ) -> None:
        """Copies bucket `index`'s tensors in, skipping those that already live there.

        Shapes and dtypes must match the layout; `cast=True` converts dtypes.
        """
        for slot in self.layout.buckets[index].slots:
            if slot.name not in tensors:
                raise KeyError(f"parameter {slot.name!r} of the layout was not given")
            src = tensors[slot.name].detach()
            if not cast or tuple(src.shape) != slot.shape:
                self._checked(slot, src)
            dst = self._views[slot.name]
            if src.data_ptr() != dst.data_ptr() or src.device != dst.device:
                dst.copy_(src)

    def pack(self, named: NamedTensors | Mapping[str, torch.Tensor], cast: bool = False) -> None:
        """Copies every tensor into its slot."""
        tensors = named if isinstance(named, Mapping) else dict(named)
        for index in range(len(self.tensors)):
            self.pack_bucket(index, tensors, cast)

    def fill(self, pairs) -> None:
        """Copies (and casts) each (name, tensor) of a one-pass stream into its slot as it comes
        (a gathered tensor may live only until the next one); every slot must come."""
        missing = set(self._views)
        for name, tensor in pairs:
            if name not in missing:
                raise KeyError(f"parameter {name!r} is not in the layout or came twice")
            slot = self.layout.slots[name]
            if tuple(tensor.shape) != slot.shape:
                self._checked(slot, tensor)
            self._views[name].copy_(tensor.detach())
            missing.discard(name)
        if missing:
            raise KeyError(f"parameters of the layout were not given: {sorted(missing)[:5]}")

    def adopt(self, named: NamedTensors) -> None:
        """Moves each parameter's storage into its slot (`param.data = view`).

        After this the owner's in-place updates (optimizer steps) land directly
        in the buffers and `pack_bucket` finds nothing to copy.
        """
        for name, param in named:
            view = self._views[name]
            view.copy_(self._checked(self.layout.slots[name], param).detach())
            param.data = view

    def checksum(self) -> str:
        return buffer_checksum(self.tensors)


class RowDigest:
    """``buffer_checksum`` fed one bucket at a time (same result for the same buckets in the
    same order), so neither side needs the whole model in one place to checksum it."""

    def __init__(self) -> None:
        self._digest = hashlib.blake2b(digest_size=16)

    def update(self, flat: torch.Tensor) -> None:
        """`flat`: one bucket's (numel,) tensor, its bytes a multiple of `ROW_BYTES`."""
        words = flat.view(torch.uint8).view(torch.int64).view(-1, ROW_WORDS)  # (R, ROW_WORDS)
        row_sums = words.sum(dim=1)  # (R,) int64, wraps modulo 2**64
        self._digest.update(f"{flat.dtype}:{flat.numel()};".encode())
        self._digest.update(row_sums.cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def buffer_checksum(tensors: Sequence[torch.Tensor]) -> str:
    """Checksum of flat buffers whose byte sizes are multiples of `ROW_BYTES` (see module doc)."""
    digest = RowDigest()
    for tensor in tensors:
        digest.update(tensor)
    return digest.hexdigest()


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gloo_device(host: str | None):
    if host is None:
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=host)


NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_CLEANUP_ONLY = "2"
"""On a timed-out or failed collective, abort the communicators and raise in ``wait``; torch's
default (3) tears the whole process down, which for the learner means every FSDP rank."""


@contextmanager
def _nccl_cleanup_only() -> Iterator[None]:
    """Weight-sync NCCL groups are built with ``CleanUpOnly`` error handling; the variable is
    read when a group is constructed, so the learner's own FSDP group keeps its setting."""
    before = os.environ.get(NCCL_ERROR_HANDLING)
    os.environ[NCCL_ERROR_HANDLING] = NCCL_CLEANUP_ONLY
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NCCL_ERROR_HANDLING, None)
        else:
            os.environ[NCCL_ERROR_HANDLING] = before


def make_group(
    store, rank: int, size: int, device: torch.device, timeout: timedelta, host: str | None
):
    """A process group on `store` without touching the default group: NCCL on CUDA, else gloo."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("weights live on CUDA but this torch build has no NCCL")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        with _nccl_cleanup_only():
            return dist.ProcessGroupNCCL(store, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [_gloo_device(host)]
    return dist.ProcessGroupGloo(store, rank, size, options)


def start_broadcast(group, tensor: torch.Tensor, timeout: timedelta):
    """Starts a broadcast from rank 0 of `group`; returns the work to wait on."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    options.timeout = timeout
    return group.broadcast([tensor], options)


def drop_group(group, device: torch.device) -> None:
    """Releases a group that is being abandoned: NCCL communicators are aborted (a member
    that died leaves the others' kernels waiting); a gloo group is dropped, its pending ops
    having failed or timed out."""
    if group is not None and device.type == "cuda":
        group.abort()  # NCCL communicators of a failed generation must not linger
