"""Build (once) and cache the embedded default task: tokenizer, model, data.

``prepare_default_task`` writes into the cache directory

    model/            config.json, generation_config.json, model.safetensors,
                      tokenizer.json, tokenizer_config.json (warm-started)
    data/train.parquet, data/val.parquet   (DAPO-Math / verl schema)
    task.json         completion marker: fingerprint + measured figures

``task.json`` is written last and atomically, so a cache without it (an
interrupted build) is rebuilt, and a cache whose fingerprint differs from the
current settings is rebuilt too. A file lock keeps two processes that start
at the same time from building over each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo.data.task.build import build_data, build_model_dir, warm_start
from dapo.data.task.spec import TaskSpec

MARKER = "task.json"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "default-task"


@dataclass(frozen=True)
class DefaultTask:
    """Paths and measured figures of a built default task."""

    root: Path
    model_dir: Path
    train_file: Path
    val_file: Path
    base_accuracy: float
    """Sampled (temperature 1, top_p 1) held-out accuracy of the warm-started model."""
    num_parameters: int
    sft_steps: int
    sft_seconds: float
    num_train: int
    num_val: int
    fingerprint: str

    @property
    def tokenizer_dir(self) -> Path:
        return self.model_dir


# Marker keys that become DefaultTask fields.
_MARKER_FIELDS = (
    "base_accuracy",
    "num_parameters",
    "sft_steps",
    "sft_seconds",
    "num_train",
    "num_val",
    "fingerprint",
)


def _paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "model", root / "data" / "train.parquet", root / "data" / "val.parquet"


def load_default_task(
    cache_dir: Path | None = None, spec: TaskSpec | None = None
) -> DefaultTask | None:
    """The cached task if its marker exists and matches ``spec``; None otherwise."""
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable marker: treat the cache as incomplete
    if not isinstance(info, dict) or info.get("fingerprint") != (spec or TaskSpec()).fingerprint():
        return None
    if any(k not in info for k in _MARKER_FIELDS):
        return None
    model_dir, train_file, val_file = _paths(root)
    if not all(p.exists() for p in (model_dir, train_file, val_file)):
        return None
    return DefaultTask(
        root=root,
        model_dir=model_dir,
        train_file=train_file,
        val_file=val_file,
        **{k: info[k] for k in _MARKER_FIELDS},
    )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_marker(root: Path, info: dict[str, Any]) -> None:
    tmp = root / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, root / MARKER)


def prepare_default_task(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    sft_steps: int | None = None,
    spec: TaskSpec | None = None,
) -> DefaultTask:
    """Build the default task into ``cache_dir`` unless a matching build is already there.

    ``sft_steps`` replaces the calibrated warm start by exactly that many
    supervised steps with no early stop (a fast mode for tests); it is part of
    the fingerprint, so such a build never passes for the calibrated one.
    """
    spec = spec or TaskSpec()
    if sft_steps is not None:
        sft = dataclasses.replace(spec.sft, max_steps=sft_steps, target_accuracy=None)
        spec = dataclasses.replace(spec, sft=sft)
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    if not force and (task := load_default_task(root, spec)) is not None:
        return task
    with _locked(root):
        # Another process may have finished the build while this one waited.
        if not force and (task := load_default_task(root, spec)) is not None:
            return task
        with _torch_threads(spec.threads):
            _build(root, spec, progress)
    task = load_default_task(root, spec)
    if task is None:
        raise RuntimeError(f"default task build in {root} left no valid {MARKER}")
    return task


def _build(root: Path, spec: TaskSpec, progress: bool) -> None:
    """Write tokenizer, data, warm-started model, then the marker (last)."""
    from transformers import AutoTokenizer

    (root / MARKER).unlink(missing_ok=True)
    model_dir, train_file, val_file = _paths(root)
    for stale in (model_dir, train_file.parent):
        shutil.rmtree(stale, ignore_errors=True)
    train, val = build_data(spec, train_file, val_file)
    model = build_model_dir(spec, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    figures = warm_start(model, tokenizer, train, val, spec, progress)
    figures["sft_seconds"] = round(time.perf_counter() - t0, 2)
    model.save_pretrained(str(model_dir))
    _write_marker(
        root,
        {
            **figures,
            "num_train": len(train),
            "num_val": len(val),
            "fingerprint": spec.fingerprint(),
            "spec": dataclasses.asdict(spec),
        },
    )
