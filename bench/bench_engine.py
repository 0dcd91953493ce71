"""Throughput of the rollout engines on CPU: the HF engine and vLLM (its CPU build).

Figures:
- ``engine.hf_samples_per_s`` / ``engine.vllm_samples_per_s``: samples generated per
  second on the default task as ``cpu-small`` samples it (16 prompts x 8 samples, up to
  16 new tokens, temperature 1), with the warm-started model.
- ``engine.hf_large_samples_per_s`` / ``engine.vllm_large_samples_per_s``: the same for a
  larger Qwen2-shaped model with random weights (26M parameters: 6 layers, hidden 512,
  vocabulary 8192) and long answers (4 prompts x 4 samples, up to 256 new tokens; an EOS
  after ~200 tokens on average, so lengths vary as in real rollouts), where vLLM's
  continuous batching and kernels should matter.
  Each is the median of 3 timed calls after a warm-up call, with ``_min`` and ``_max``;
  both engines use the machine's cores (vLLM binds its threads to them), one engine at a
  time, in the same process.
- ``engine.hf_tokens_per_s``: response tokens per second of the HF engine on a tiny
  random model, one thread (8 prompts x 4 samples, up to 64 new tokens).
- ``engine.checksum_mparams_per_s``: millions of float32 parameters hashed per second by
  ``weights_checksum``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from dapo.data.task import prepare_default_task
from dapo.data.task.tokenizer import EOS_ID
from dapo.engines.hf import HFEngine
from proto.messages import SamplingParams

REPS = 3
LARGE_EOS = 0


def _tiny_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def _large_model_dir(path: Path) -> Path:
    """A ~26M-parameter Qwen2 with random weights whose answers end with an EOS after about
    200 tokens on average, at very different lengths. Its head sees one hidden unit (the
    other logits are 0): the EOS logit 2.7 h_0 gives E[exp] = exp(2.7**2 / 2) = 1/200 of the
    vocabulary's mass. The compute is that of the full model all the same."""
    config = Qwen2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=LARGE_EOS, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[LARGE_EOS, 0] = 2.7
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=LARGE_EOS).save_pretrained(path)
    return path


def _arithmetic_prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 100, (count, 2), generator=gen).tolist()
    return [list(f"{a}+{b}=".encode()) for a, b in pairs]


def _rates(generate, prompts: list[list[int]], params: SamplingParams) -> list[float]:
    """Samples per second of ``REPS`` timed calls after a short warm-up call."""
    generate(prompts, params.model_copy(update={"max_new_tokens": 4}))
    rates = []
    for _ in range(REPS):
        start = time.perf_counter()
        groups = generate(prompts, params)
        rates.append(sum(len(g) for g in groups) / (time.perf_counter() - start))
    return rates


def _figures(name: str, rates: list[float]) -> dict[str, float]:
    return {
        f"engine.{name}_samples_per_s": statistics.median(rates),
        f"engine.{name}_samples_per_s_min": min(rates),
        f"engine.{name}_samples_per_s_max": max(rates),
    }


def _vllm_rates(model_dir: Path, eos: int, prompts, params, max_len: int) -> list[float]:
    from dapo.engines.vllm import VLLMEngine

    engine = VLLMEngine(
        model_dir, eos, dtype="float32", enforce_eager=True, max_model_len=max_len,
        engine_kwargs={"kv_cache_memory_bytes": 512 << 20},
    )  # fmt: skip
    try:
        return _rates(engine.generate, prompts, params)
    finally:
        engine.close()


def _tiny_figures() -> dict[str, float]:
    torch.set_num_threads(1)
    engine = HFEngine(_tiny_model())
    prompts = [[(7 * i + j) % 500 + 1 for j in range(8 + 3 * i)] for i in range(8)]
    params = SamplingParams(n=4, max_new_tokens=64, seed=0)
    engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2, seed=0))  # warm-up
    tokens, elapsed = 0, 0.0
    for _ in range(3):
        start = time.perf_counter()
        groups = engine.generate(prompts, params)
        elapsed += time.perf_counter() - start
        tokens += sum(len(c) for group in groups for c in group)
    n_params = sum(p.numel() for _, p in engine.named_parameters())
    start = time.perf_counter()
    for _ in range(5):
        engine.weights_checksum()
    checksum_s = (time.perf_counter() - start) / 5
    return {
        "engine.hf_tokens_per_s": tokens / elapsed,
        "engine.checksum_mparams_per_s": n_params / checksum_s / 1e6,
    }


def run() -> dict[str, float]:
    figures = _tiny_figures()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores vLLM binds its threads to
    task_dir = prepare_default_task(progress=False).model_dir
    task_prompts, task_params = (
        _arithmetic_prompts(16),
        SamplingParams(n=8, max_new_tokens=16, seed=0),
    )
    large_prompts = [[(37 * i + 11 * j) % 8191 + 1 for j in range(32)] for i in range(4)]
    large_params = SamplingParams(n=4, max_new_tokens=256, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        large_dir = _large_model_dir(Path(tmp))
        # HF first: a vLLM engine in this process pins torch's threads for good
        hf = HFEngine(str(task_dir), EOS_ID)
        figures |= _figures("hf", _rates(hf.generate, task_prompts, task_params))
        hf = HFEngine(str(large_dir), LARGE_EOS)
        figures |= _figures("hf_large", _rates(hf.generate, large_prompts, large_params))
        del hf
        rates = _vllm_rates(task_dir, EOS_ID, task_prompts, task_params, 128)
        figures |= _figures("vllm", rates)
        rates = _vllm_rates(large_dir, LARGE_EOS, large_prompts, large_params, 320)
        figures |= _figures("vllm_large", rates)
    return figures


if __name__ == "__main__":
    print(run())
