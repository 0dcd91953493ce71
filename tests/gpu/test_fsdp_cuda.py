"""A short end-to-end loop on one GPU: the learner as one FSDP2 rank under torchrun with NCCL,
bf16 mixed precision over float32 master weights, and the HF engine in bf16 on the same GPU.
Each step the engine generates, the learner trains on it, and the gathered weights go back
into the engine (in process: an NCCL broadcast to a second process needs a second GPU);
then a sharded (DCP) checkpoint whose Hugging Face copy holds the trained weights.

The worker half of this file runs under ``torchrun`` (``python -m torch.distributed.run``)
and writes its findings to a JSON file the test reads.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
BF16 = {"fsdp_config": {"mixed_precision": {"param_dtype": "bf16"}}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_fsdp_rank_with_nccl_trains_and_feeds_the_engine(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), str(tmp_path), "cuda"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["backend"] == "nccl" and r["world"] == 1 and r["device"] == "cuda:0"
    assert [s["version"] for s in r["steps"]] == list(range(1, STEPS + 1))
    for s in r["steps"]:
        assert s["finite"] and s["moved"] > 0, s
        assert s["engine_gap"] == 0.0, s  # the engine holds the learner's weights (bf16)
        assert s["logp_gap"] < 0.1, s  # the engine's log-probs: the learner's, bf16 apart
    assert r["param_dtypes"] == ["torch.float32"] and r["compute_dtypes"] == ["torch.bfloat16"]
    assert r["checkpoint_max_diff"] == 0.0  # the HF copy holds the gathered weights


def _step(trainer, model, engine, prompts, step: int) -> dict:
    """Generate, train, hand the weights to the engine; what the test checks of it."""
    from bench.gpu_check import scored_batch
    from proto.messages import SamplingParams
    from services.learner.batching import pack_batch
    from services.learner.distributed import full_params

    outs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=step))
    batch = scored_batch(prompts, outs, version=step, batch_id=step)
    packed = pack_batch(batch, 0, True).to(trainer.device)
    with torch.no_grad():  # the learner's log-probs of the tokens, on the engine's weights
        logp, _ = trainer.forward_logp(model.eval(), packed)
    mask = packed.mask.bool()
    logp_gap = float((logp.float() - packed.old_logp_rollout.float())[mask].abs().max())
    before = {n: p.clone() for n, p in full_params(model).items()}
    figures = trainer.train_batch(batch)
    full = full_params(model)
    engine.load_weights(full.items())
    held = dict(engine.named_parameters())
    return {
        "version": trainer.version,
        "finite": bool(torch.isfinite(torch.tensor(figures["loss"]))),
        "moved": max(float((full[n] - before[n]).abs().max()) for n in full),
        "engine_gap": max(float((held[n].float() - full[n].bfloat16().float()).abs().max())
                          for n in full),
        "logp_gap": logp_gap,
    }  # fmt: skip


def _worker(out: Path, device: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dapo.engines.hf import HFEngine
    from services.learner.distributed import full_params, save_sharded_checkpoint, shard_model
    from services.learner.model_init import mixed_precision
    from services.learner.ranks import init_ranks
    from services.learner.trainer import Trainer
    from tests.services.learner.test_trainer import spec, tiny_model

    ranks = init_ranks(device, int(os.environ.get("LOCAL_RANK", "0")))
    cfg = spec(**BF16)
    base = tiny_model()
    engine = HFEngine(copy.deepcopy(base), eos=[1], device=ranks.device, dtype=torch.bfloat16)
    model = shard_model(copy.deepcopy(base).to(ranks.device), mixed_precision(cfg))
    seen: set[str] = set()
    q_proj = model.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_pre_hook(lambda m, _: seen.add(str(m.weight.dtype)))
    trainer = Trainer(model, cfg, ranks.device, pad_id=0, ranks=ranks)
    prompts = [[5, 9, 17], [3, 4], [40, 41, 42, 43, 44], [7]]
    steps = [_step(trainer, model, engine, prompts, i) for i in range(STEPS)]
    hook.remove()
    ckpt = save_sharded_checkpoint(
        ranks, out / "checkpoints", STEPS, model, None, trainer.state(), trainer.optimizer
    )
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    full = {n: t.cpu() for n, t in full_params(model).items()}
    result = {
        "backend": dist.get_backend(),
        "world": ranks.world,
        "device": ranks.device,
        "steps": steps,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "compute_dtypes": sorted(seen),
        "checkpoint_max_diff": max(
            float((p.detach() - full[n]).abs().max()) for n, p in hf.named_parameters()
        ),
    }
    (out / "result.json").write_text(json.dumps(result))
    ranks.close()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
