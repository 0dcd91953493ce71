"""The tiny Qwen2-architecture policy of the default task (about 1M parameters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo.data.task.tokenizer import EOS_ID, VOCAB_SIZE


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of the tiny model; part of the cache fingerprint."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 512


def tiny_config(shape: ModelShape) -> Qwen2Config:
    """A Qwen2Config for the byte vocabulary, tied embeddings, EOS = pad = 256."""
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        use_cache=True,
    )


def build_model(shape: ModelShape, seed: int) -> Qwen2ForCausalLM:
    """Randomly initialised model; the same seed gives bit-identical weights."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(shape))
    finally:
        torch.random.set_rng_state(gen_state)
    # Sampling defaults of the saved generation config: plain temperature-1
    # sampling over the full vocabulary (no hidden top-k of 50).
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = 0
    model.generation_config.top_p = 1.0
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
