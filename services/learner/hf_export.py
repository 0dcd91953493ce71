"""A plain Hugging Face copy of a sharded model, written one parameter at a time.

Evaluation and rollout workers that join late load a checkpoint with a plain
``AutoModelForCausalLM.from_pretrained``: safetensors files, ``config.json``, the
tokenizer. Gathering the full state dict on rank 0 first would hold the whole model in
host memory (128 GB for a 32B model in float32). Here the layout of every file (names,
dtypes, global shapes, hence offsets) is known before any data moves, so each file's
header is written first; then each parameter in turn is all-gathered
(``DTensor.full_tensor``, a collective: every rank calls this), copied to host on rank 0
and appended. At most one full parameter is alive at a time. Files are cut at
``MAX_FILE_BYTES`` with the ``model.safetensors.index.json`` of ``save_pretrained``; a
tied parameter is written once, under its first name, as ``save_pretrained`` does
(loading re-ties it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch.distributed.tensor import DTensor

MAX_FILE_BYTES = 5 * 1024**3
"""Largest safetensors file of an export (``save_pretrained``'s default shard size)."""
INDEX = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def export_hf(
    model: torch.nn.Module, out_dir: Path, is_writer: bool, max_file_bytes: int = MAX_FILE_BYTES
) -> None:
    """Every rank (one all-gather per sharded tensor): the model's weights as safetensors
    files, plus ``config.json`` and the generation config, written by ``is_writer``
    (rank 0) into ``out_dir``."""
    files = list(_split(weight_entries(model), max_file_bytes))
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    for name, entries in zip(names, files, strict=True):
        handle = (out_dir / name).open("wb") if is_writer else None
        try:
            if handle is not None:
                handle.write(_header(entries))
            for _, tensor in entries:
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if handle is not None:
                    _write_data(handle, full)
                del full
        finally:
            if handle is not None:
                handle.close()
    if is_writer:
        if len(files) > 1:
            _write_index(out_dir, names, files)
        _write_config(model, out_dir)


def weight_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter (a tied one once, first name) and persistent
    buffer, sharded (DTensor) where the model is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # a no-grad forward may leave the root unsharded
        if isinstance(module, FSDPModule):
            module.reshard()
    params = dict(model.named_parameters())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(n, t) for n, t in model.state_dict().items() if n not in aliases]
    return [(n, p.detach()) for n, p in params.items()] + buffers


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _split(
    entries: list[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in entries:
        if group and size + _nbytes(t) > max_bytes:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += _nbytes(t)
    if group or not entries:
        yield group


def _header(entries: list[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors header: u64 little-endian length, then JSON padded to 8 bytes."""
    doc: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in entries:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        end = offset + _nbytes(t)
        doc[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_data(handle: BinaryIO, full: torch.Tensor) -> None:
    host = full.detach().to("cpu").contiguous().reshape(-1)  # one parameter on host
    handle.write(memoryview(host.view(torch.uint8).numpy()))


def _write_index(out_dir: Path, names: list[str], files: list) -> None:
    weight_map = {n: fname for fname, entries in zip(names, files, strict=True) for n, _ in entries}
    total = sum(_nbytes(t) for entries in files for _, t in entries)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(doc, indent=2))


def _write_config(model: torch.nn.Module, out_dir: Path) -> None:
    config = copy.deepcopy(model.config)
    config.dtype = next(model.parameters()).dtype  # the master weights written
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out_dir)
