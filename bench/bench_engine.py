"""Throughput of the HF inference engine on a tiny random Qwen2 model on CPU.

Figures:
- ``engine.hf_tokens_per_s``: response tokens generated per second (8 prompts
  x 4 samples, up to 64 new tokens, KV-cached batched decoding).
- ``engine.checksum_mparams_per_s``: millions of float32 parameters hashed per
  second by ``weights_checksum``.
"""

from __future__ import annotations

import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo.engines.hf import HFEngine
from proto.messages import SamplingParams


def _model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def run() -> dict[str, float]:
    torch.set_num_threads(1)
    engine = HFEngine(_model())
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


if __name__ == "__main__":
    print(run())
