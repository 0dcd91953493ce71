"""The vLLM engine's knobs, kept apart from ``dapo.engines.vllm`` so that reading them needs
no vLLM: a rollout pod reads them with its other settings at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VLLMSettings(BaseSettings):
    """vLLM knobs of a rollout pod (DAPO_VLLM_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="DAPO_VLLM_", extra="ignore", frozen=True)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM compute dtype; auto = the run spec's rollout.dtype."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spans."""
    gpu_memory_utilization: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of GPU memory for vLLM; 0 = 0.9 minus the weight-sync buffers."""
    max_model_len: int = Field(0, ge=0)
    """Context length; 0 = data.max_prompt_length + data.max_response_length."""
    kv_cache_mb: float = Field(0.0, ge=0.0)
    """KV cache size; 0 = from gpu_memory_utilization on a GPU, 256 MiB on a CPU."""
    enforce_eager: bool = False
    """Disable CUDA graphs (always on a CPU)."""
    in_process: bool = True
    """Run vLLM's engine core in this process: weight updates between decode steps, and
    zero-copy loading with one GPU. False: updates wait for the end of a generation."""
    async_scheduling: bool = False
    """vLLM's async scheduling (GPU): overlaps scheduling with the forward pass, but a batch
    is then always in flight, so updates wait for the end of a generation."""
    load_chunk_mb: float = Field(256.0, gt=0.0)
    """Bytes per weight-loading call."""
    gate_timeout_s: float = Field(600.0, gt=0.0)
    """Longest wait of a weight update for running generation (and vice versa)."""
