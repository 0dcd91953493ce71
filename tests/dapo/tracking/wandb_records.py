"""Reading back what W&B wrote offline: the records of a ``run-<id>.wandb`` file.

The file is W&B's transaction log (LevelDB's log format: a 7-byte header, then 32 KiB blocks
of chunks, each ``crc32c (4) | length (2) | type (1) | data``, a record split over blocks as
FIRST, MIDDLE..., LAST chunks); each record is a ``wandb_internal_pb2.Record``, W&B's own
protobuf. Recent wandb releases parse this file only in their Go core, so the framing is
read here and the records with wandb's schema.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = 7
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    out: list[bytes] = []
    pending = b""
    pos = HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def read_run(path: Path) -> dict:
    """``{"run": Record.run, "config": {...}, "history": [{key: value}, ...], "exited": bool}``
    (``exited``: the log holds the run's exit record, W&B's last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run, config, history, exited = None, {}, [], False
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        exited = exited or kind == "exit"
        if kind == "run":
            run = record.run
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        else:
            updates = []
        for item in updates:
            config[item.key] = json.loads(item.value_json)
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return {"run": run, "config": config, "history": history, "exited": exited}
