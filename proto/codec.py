"""Wire encoding of messages as Redis stream fields.

A message becomes four fields:

- ``v``: schema version (ASCII integer);
- ``k``: message kind (``prompt_task``, ``rollout_group`` ...);
- ``h``: a small JSON header, the model's fields with every array replaced by
  a reference ``{"@a": [dtype, byte_offset, count]}``;
- ``b``: all arrays packed back to back as raw little-endian bytes.

Decoding reads arrays straight out of ``b`` with ``np.frombuffer`` (no copy,
read-only), so a G=16 x 4096-token group costs well under a millisecond.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from proto.messages import SCHEMA_VERSION, Message

SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})
M = TypeVar("M", bound=Message)
_REF = "@a"


class DecodeError(ValueError):
    """A stream entry that cannot become the expected message (dead-letter it)."""


class UnknownSchemaVersion(DecodeError):
    """The entry was written with a schema version this consumer does not know."""


def _pack(value: Any, chunks: list[np.ndarray], offset: list[int]) -> Any:
    if isinstance(value, np.ndarray):
        arr = value if value.dtype.byteorder != ">" else value.astype(value.dtype.newbyteorder("<"))
        ref = {_REF: [arr.dtype.str, offset[0], int(arr.size)]}
        chunks.append(arr)
        offset[0] += arr.nbytes
        return ref
    if isinstance(value, BaseModel):  # walk fields directly: no model_dump copy
        return {k: _pack(v, chunks, offset) for k, v in value.__dict__.items()}
    if isinstance(value, dict):
        return {k: _pack(v, chunks, offset) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pack(v, chunks, offset) for v in value]
    return value


def _unpack(value: Any, blob: bytes) -> Any:
    if isinstance(value, dict):
        ref = value.get(_REF)
        if ref is not None and len(value) == 1:
            dtype, off, count = ref
            return np.frombuffer(blob, dtype=np.dtype(dtype), count=count, offset=off)
        return {k: _unpack(v, blob) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, blob) for v in value]
    return value


def encode(msg: Message) -> dict[str, bytes | memoryview]:
    """Message -> stream fields."""
    chunks: list[np.ndarray] = []
    size = [0]
    header = _pack(msg, chunks, size)
    # one allocation for the whole payload, each array copied once, straight into it
    blob = np.empty(size[0], dtype=np.uint8)
    at = 0
    for arr in chunks:
        blob[at : at + arr.nbytes] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        at += arr.nbytes
    return {
        "v": str(msg.schema_version).encode(),
        "k": msg.kind.encode(),
        "h": json.dumps(header, separators=(",", ":")).encode(),
        "b": memoryview(blob),
    }


def _field(fields: dict, name: str) -> bytes | memoryview:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise DecodeError(f"entry has no '{name}' field (fields: {sorted(map(str, fields))})")
    return value if isinstance(value, bytes | bytearray | memoryview) else str(value).encode()


def decode(fields: dict, expected: type[M]) -> M:
    """Stream fields -> message of the expected type, or DecodeError saying why."""
    raw_version = _field(fields, "v")
    try:
        version = int(raw_version)
    except ValueError:
        raise DecodeError(f"schema version {raw_version!r} is not an integer") from None
    if version not in SUPPORTED_VERSIONS:
        raise UnknownSchemaVersion(
            f"schema version {version} is not supported by this consumer "
            f"(knows {sorted(SUPPORTED_VERSIONS)}); upgrade the consumer"
        )
    kind = _field(fields, "k").decode(errors="replace")
    if kind != expected.kind:
        raise DecodeError(f"expected a '{expected.kind}' message, got '{kind}'")
    try:
        header = json.loads(_field(fields, "h"))
        payload = _unpack(header, _field(fields, "b") if b"b" in fields or "b" in fields else b"")
        return expected.model_validate(payload)
    except ValidationError as exc:
        raise DecodeError(f"invalid {kind}: {exc}") from exc
    except (ValueError, TypeError) as exc:  # bad JSON, array ref outside the blob, ...
        raise DecodeError(f"malformed {kind}: {exc}") from exc
