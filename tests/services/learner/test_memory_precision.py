"""bf16 mixed precision in one process (``actor.fsdp_config.mixed_precision.param_dtype:
bf16``): forward and backward in bf16, while the master weights, their gradients and the
optimizer state stay float32; the figures move by bf16 rounding only. The sharded
counterpart (FSDP2's policy) is checked by test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch

from proto.runspec import RunSpec
from services.learner.batching import pack_batch
from services.learner.model_init import compute_dtype, mixed_precision
from services.learner.trainer import Trainer
from tests.services.learner.test_trainer import rollout_batch, spec, tiny_model

torch.set_num_threads(1)
BF16 = {"fsdp_config": {"mixed_precision": {"param_dtype": "bf16"}}}


def test_spec_field_follows_verl():
    assert compute_dtype(RunSpec()) is None and mixed_precision(RunSpec()) is None
    for name in ("bf16", "bfloat16"):
        s = spec(fsdp_config={"mixed_precision": {"param_dtype": name}})
        assert compute_dtype(s) == torch.bfloat16
        policy = mixed_precision(s)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError):  # bf16 gradient sums would round fp32 updates away
        spec(fsdp_config={"mixed_precision": {"param_dtype": "bf16", "reduce_dtype": "bf16"}})


def test_bf16_compute_keeps_fp32_master_weights_and_optimizer_state():
    base = tiny_model()
    batch = rollout_batch(base)
    mixed = Trainer(copy.deepcopy(base), spec(**BF16), "cpu", pad_id=0)
    full = Trainer(copy.deepcopy(base), spec(), "cpu", pad_id=0)
    packed = pack_batch(batch, 0, True).select(torch.arange(16))
    with torch.no_grad():
        lp_mixed, _ = mixed.forward_logp(mixed.model.eval(), packed)
        lp_full, _ = full.forward_logp(full.model.eval(), packed)
    gap = float((lp_mixed - lp_full)[packed.mask.bool()].abs().max())
    assert lp_mixed.dtype == torch.float32
    assert 0.0 < gap < 0.05  # bf16 compute, visibly, and only bf16 rounding apart
    f_mixed, f_full = mixed.train_batch(batch), full.train_batch(batch)
    assert mixed.version == full.version == 1
    for k in ("loss", "grad_norm", "entropy"):
        assert f_mixed[k] == pytest.approx(f_full[k], rel=0.03, abs=1e-3), k
    params = list(mixed.model.parameters())
    assert {p.dtype for p in params} == {p.grad.dtype for p in params} == {torch.float32}
    state = [v for s in mixed.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert state and {v.dtype for v in state} == {torch.float32}
