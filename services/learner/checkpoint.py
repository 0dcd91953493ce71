"""Hugging Face-format checkpoints that also carry what an exact resume needs.

``<run>/checkpoints/step_000012/`` holds ``model.safetensors`` (or HF's sharded
files and index) + ``config.json`` + tokenizer files (loadable by plain
``AutoModelForCausalLM.from_pretrained``: evaluation and late-joining rollout workers
read it), plus ``trainer_state.json`` (step, policy version, training and optimizer
step counts) and the optimizer state. One process (this module) writes the plain files
of ``save_pretrained`` and ``optimizer.pt``; a sharded learner writes the same HF
files streamed one parameter at a time, and the model and optimizer shards as a DCP
folder (``services.learner.distributed``). A checkpoint is written to a temporary
folder and renamed into place, so a crash never leaves a half-written "newest"
checkpoint; a save that fails (a full disk) removes its temporary folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer | None,
) -> Path:
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = json.dumps({"step": step, **trainer_state}, indent=2)
        (tmp / "trainer_state.json").write_text(state)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def newest_checkpoint(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def read_optimizer_state(ckpt: Path) -> dict | None:
    path = ckpt / "optimizer.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints (0 = keep all)."""
    if keep <= 0 or not root.is_dir():
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
