"""The learner's model on its ranks: built on ``meta``, sharded, then loaded once.

Qwen2.5-32B is 128 GB in float32. Loading it whole on every rank and sharding it
afterwards needs the whole model on each rank's host and device for a moment (8 ranks:
a terabyte of host memory). Instead, with more than one rank:

1. rank 0 reads the config and sends it; every rank builds the model on the ``meta``
   device (shapes, no memory), with ``model.dtype`` parameters (the master weights);
2. ``fully_shard`` wraps each decoder layer, then the root (FSDP2, with the mixed
   precision of ``actor.fsdp_config.mixed_precision``); activation checkpointing, when
   ``model.enable_gradient_checkpointing``, is applied to each layer before that;
3. every rank materialises only its own shards, empty, on its device, and recomputes
   the non-persistent buffers (rotary frequencies: in no file) with the model's own
   initialiser;
4. rank 0 alone reads the safetensors files, at most ``LOAD_BATCH_BYTES`` at a time,
   and broadcasts each tensor; every rank copies its slice into its shard
   (``set_model_state_dict(..., broadcast_from_rank0=True)``), converting to the master
   dtype. A rank never holds more than its shards plus one batch (rank 0) or one tensor
   (the others). Resuming skips this step: the weights come with the DCP training state
   (``services.learner.distributed``).

Tied embeddings stay one parameter throughout (built tied, sharded once, loaded once).
One process (``SoloRanks``) keeps the plain ``from_pretrained``: no process group.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proto.runspec import RunSpec
from services.learner.distributed import decoder_layers, shard_model
from services.learner.ranks import Ranks

log = logging.getLogger(__name__)
LOAD_BATCH_BYTES = 1 << 30
"""Most bytes of weights rank 0 reads from the files before broadcasting them."""


def compute_dtype(spec: RunSpec) -> torch.dtype | None:
    """The dtype parameters are cast to for compute (bf16 mixed precision), or None."""
    name = spec.actor.fsdp_config.mixed_precision.compute_dtype
    return None if name is None else getattr(torch, name)


def mixed_precision(spec: RunSpec):
    """FSDP2's policy: parameters gathered in the compute dtype, gradients reduced in
    float32 into float32 shards; None when compute is in ``model.dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = compute_dtype(spec)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer: only each layer's input is kept for
    backward, which recomputes the rest. The composable API keeps parameter names (no
    wrapper module) and works in eval mode (HF's own needs ``model.train()``, and the
    learner runs in eval mode: no dropout)."""
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(model):
        checkpoint(layer)


def load_plain(source: Path, spec: RunSpec, device: str, frozen: bool) -> nn.Module:
    """One process: the model of ``source`` in ``model.dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).to(device)
    if frozen:
        model.eval().requires_grad_(False)
    elif spec.model.enable_gradient_checkpointing:
        checkpoint_layers(model)
    return model


def load_sharded(
    source: Path | None, spec: RunSpec, ranks: Ranks, *, frozen: bool, weights: bool
) -> nn.Module:
    """Every rank: the model of ``source`` (a HF directory only rank 0 reads; None on the
    others), sharded over the ranks; its weights loaded from rank 0 when ``weights``,
    else left empty for a DCP state to fill."""
    from transformers import AutoConfig

    config = broadcast_object(AutoConfig.from_pretrained(str(source)) if ranks.rank == 0 else None)
    model = build_sharded(
        config,
        getattr(torch, spec.model.dtype),
        ranks.device,
        mp_policy=mixed_precision(spec),
        frozen=frozen,
        gradient_checkpointing=spec.model.enable_gradient_checkpointing and not frozen,
    )
    if weights:
        load_from_rank0(model, source if ranks.rank == 0 else None)
    return model


def build_sharded(
    config,
    dtype: torch.dtype,
    device: str,
    *,
    mp_policy=None,
    frozen: bool = False,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Every rank: the model of ``config`` built on ``meta``, sharded with FSDP2 and
    materialised empty on ``device`` (its shards only), non-persistent buffers set."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if frozen:  # before sharding, so FSDP2 sees frozen parameters
        model.eval().requires_grad_(False)
    if gradient_checkpointing:
        checkpoint_layers(model)
    shard_model(model, mp_policy)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:  # e.g. rotary inv_freq: in no file
                model._init_weights(module)
    return model


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (default group)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_from_rank0(model: nn.Module, source: Path | None) -> None:
    """Every rank: the weights of the safetensors files in ``source`` (rank 0; None on the
    others) into the sharded ``model``, one batch of at most ``LOAD_BATCH_BYTES`` at a
    time. A file that misses a parameter is refused on every rank."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    plan: list[tuple[Path, list[str]]] | str = []
    if source is not None:
        try:
            plan = load_plan(source, model)
        except ValueError as exc:
            plan = str(exc)
    plan = broadcast_object(plan if source is not None else None)
    if isinstance(plan, str):
        raise ValueError(plan)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for path, keys in plan:
        batch: dict[str, torch.Tensor] = {}
        if source is not None:
            with safe_open(str(path), framework="pt") as f:
                batch = {k: f.get_tensor(k) for k in keys}
        set_model_state_dict(model, batch, options=opts)
        del batch


def load_plan(source: Path, model: nn.Module) -> list[tuple[Path, list[str]]]:
    """(file, keys) batches of at most ``LOAD_BATCH_BYTES`` covering every parameter and
    persistent buffer of ``model`` (any one name of a tied parameter); keys the model does
    not have are skipped with a warning."""
    from safetensors import safe_open

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source} holds no *.safetensors weights (the learner reads only those)")
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    known = set(model.state_dict())  # parameters and persistent buffers
    params = {n for names in aliases.values() for n in names}
    needed = [*aliases.values(), *([n] for n in known - params)]
    plan, seen = [], set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            batch, size = [], 0
            for key in f.keys():
                if key not in known:
                    log.warning("%s: %s is not a weight of the model: skipped", path.name, key)
                    continue
                s = f.get_slice(key)
                nbytes = _numel(s.get_shape()) * _ITEMSIZE.get(s.get_dtype(), 8)
                if batch and size + nbytes > LOAD_BATCH_BYTES:
                    plan.append((path, batch))
                    batch, size = [], 0
                batch.append(key)
                size += nbytes
                seen.add(key)
            if batch:
                plan.append((path, batch))
    missing = [names[0] for names in needed if not seen.intersection(names)]
    if missing:
        raise ValueError(f"{source}: no weights for {len(missing)} tensor(s), e.g. {missing[:3]}")
    return plan


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
_ITEMSIZE.update({"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1})


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
