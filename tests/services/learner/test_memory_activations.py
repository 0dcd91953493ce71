"""Activation checkpointing (``model.enable_gradient_checkpointing``): each decoder layer
is recomputed during backward, in eval mode too (the learner runs without dropout), so
the gradients are the same and the peak memory of a deep model's forward + backward
drops to about one layer's activations. The sharded counterpart is checked by
test_distributed.py (same update as one process without checkpointing)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from services.learner.batching import pack_batch
from services.learner.logprobs import response_log_probs
from services.learner.model_init import checkpoint_layers
from services.learner.trainer import Trainer
from tests.services.learner.test_memory_startup import peak_mb, reset_peak
from tests.services.learner.test_trainer import rollout_batch, spec, tiny_model

ROOT = Path(__file__).resolve().parents[3]
torch.set_num_threads(1)


def _logp(model, mb) -> torch.Tensor:
    logp, _ = response_log_probs(
        model, mb.input_ids, mb.attention_mask, mb.resp_pos, mb.resp_ids, temperature=1.0
    )
    return logp


def test_checkpointed_layers_recompute_and_give_the_same_gradients():
    base = tiny_model(torch.float64).eval()
    packed = pack_batch(rollout_batch(tiny_model()), 0, True)
    mb = packed.select(torch.arange(len(packed)))
    grads, calls = [], []
    for checkpointed in (False, True):
        model = copy.deepcopy(base)
        if checkpointed:
            checkpoint_layers(model)
        runs: list[int] = []
        model.model.layers[0].register_forward_pre_hook(lambda *_, r=runs: r.append(1))
        (_logp(model, mb) * mb.mask).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(len(runs))
    assert calls == [1, 2]  # checkpointed: the layer ran again during backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-12, rtol=0)


def test_trainer_step_is_the_same_with_checkpointed_layers():
    batch = rollout_batch(tiny_model())
    figures, params = [], []
    for checkpointed in (False, True):
        model = tiny_model(torch.float64)
        if checkpointed:
            checkpoint_layers(model)
        figures.append(Trainer(model, spec(), "cpu", pad_id=0).train_batch(batch))
        params.append({n: p.detach() for n, p in model.named_parameters()})
    for k in ("loss", "grad_norm", "entropy"):
        assert figures[1][k] == pytest.approx(figures[0][k], abs=1e-12), k
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, atol=1e-12, rtol=0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_checkpointed_layers_lower_the_peak_memory_of_a_deep_model():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    # 16 layers of activations against one layer's plus 16 layer inputs
    assert peaks["checkpointed"] < 0.4 * peaks["plain"], peaks


def _peak(checkpointed: bool) -> float:
    """Peak MiB of one forward + backward of a 16-layer model on 2 x 1024 tokens."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    if checkpointed:
        checkpoint_layers(model)
    ids = torch.randint(0, 256, (2, 1024))
    resp_pos = torch.arange(511, 1023).expand(2, -1)  # (B, T): the last 512 tokens
    before = reset_peak()
    logp, _ = response_log_probs(
        model, ids, torch.ones_like(ids), resp_pos, ids[:, 512:], temperature=1.0
    )
    logp.sum().backward()
    return peak_mb() - before


if __name__ == "__main__":
    peaks = {"checkpointed": _peak(True), "plain": _peak(False)}
    print(json.dumps(peaks))
