"""The learner and the Hugging Face engine on a CUDA GPU (``pytest -m gpu``, ``make gpu-check``):
a bf16 mixed-precision training step with float32 master weights, and engine log-probs on
CUDA against the learner's recomputation of the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.gpu_check import scored_batch
from dapo.engines.hf import HFEngine
from proto.messages import SamplingParams
from services.learner.batching import pack_batch
from services.learner.trainer import Trainer
from tests.services.learner.test_trainer import rollout_batch, spec, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16 = {"fsdp_config": {"mixed_precision": {"param_dtype": "bf16"}}}


def test_bf16_training_step_on_cuda_keeps_fp32_master_weights():
    base = tiny_model()
    batch = rollout_batch(base)  # generated on CPU: the same batch for both trainers
    mixed = Trainer(copy.deepcopy(base).cuda(), spec(**BF16), "cuda", pad_id=0)
    full = Trainer(copy.deepcopy(base).cuda(), spec(), "cuda", pad_id=0)
    f_mixed, f_full = mixed.train_batch(batch), full.train_batch(batch)
    assert mixed.version == full.version == 1
    for k in ("loss", "grad_norm", "entropy"):  # bf16 rounding apart, no more
        assert f_mixed[k] == pytest.approx(f_full[k], rel=0.03, abs=1e-3), k
    params = list(mixed.model.parameters())
    assert {p.device.type for p in params} == {"cuda"}
    assert {p.dtype for p in params} == {p.grad.dtype for p in params} == {torch.float32}
    moved = max(
        float((p.detach().cpu() - q.detach()).abs().max())
        for p, q in zip(params, base.parameters(), strict=True)
    )
    assert moved > 1e-4  # the step changed the weights on the GPU


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-4), (torch.bfloat16, 6e-2)])
def test_engine_logprobs_on_cuda_match_the_learner(dtype: torch.dtype, atol: float):
    """Engine and learner on the same weights and dtype: the recorded log-probs are the
    learner's teacher-forced ones up to the kernels' numerics (bf16: its rounding)."""
    model = tiny_model()
    engine = HFEngine(copy.deepcopy(model).to("cuda", dtype), eos=[1], device="cuda")
    assert engine.dtype == dtype
    prompts = [[5, 9, 17], [3, 4], [40, 41, 42, 43, 44], [7]]
    outs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=1))
    batch = scored_batch(prompts, outs)
    trainer = Trainer(model.to("cuda", dtype), spec(), "cuda", pad_id=0)
    packed = pack_batch(batch, 0, True)
    with torch.no_grad():
        logp, _ = trainer.forward_logp(model.eval(), packed.to("cuda"))
    mask = packed.mask.to("cuda").bool()
    gap = (logp.float() - packed.old_logp_rollout.to("cuda").float())[mask].abs().max()
    assert float(gap) <= atol
