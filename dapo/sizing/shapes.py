"""What a plan is computed from besides the run spec: the model's shape and the cluster's.

The model's shape comes from its Hugging Face ``config.json`` (read as plain JSON: no
weights, no download), so a 32B model can be planned on a laptop that holds only that
file. The cluster's shape is what the operator says it will get.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes a run spec names (``proto.vocab.ModelDType``)."""


class ModelShape(BaseModel):
    """A decoder-only transformer of the Qwen2 / Llama / Mistral family, as far as memory
    and bytes on the wire are concerned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vocab_size: int = Field(ge=1)
    """Rows of the embedding and of the output head."""
    hidden_size: int = Field(ge=1)
    """Width h of the residual stream."""
    num_layers: int = Field(ge=1)
    """Decoder layers L."""
    num_heads: int = Field(ge=1)
    """Query heads a."""
    num_kv_heads: int = Field(ge=1)
    """Key/value heads k (grouped-query attention when k < a)."""
    head_dim: int = Field(ge=1)
    """Width d of one head."""
    intermediate_size: int = Field(ge=1)
    """Width i of the SwiGLU MLP."""
    tie_word_embeddings: bool
    """The output head shares the embedding's parameters."""
    attention_bias: bool
    """q, k and v projections carry a bias (Qwen2 does, Llama does not)."""

    @model_validator(mode="after")
    def _heads_group(self) -> ModelShape:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_kv_heads}) must divide num_attention_heads "
                f"({self.num_heads})"
            )
        return self

    @property
    def q_dim(self) -> int:
        """Width a * d of the queries (and of the attention output)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width k * d of the keys, and of the values."""
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q (h x ad), k and v (h x kd each), o (ad x h), with
        biases on q, k, v when ``attention_bias``; gate and up (h x i) and down (i x h); two
        RMSNorm weights (h each)."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        return attn + 3 * h * i + 2 * h

    def embedding_params(self) -> int:
        """Parameters of the token embedding (V x h); the head has as many unless tied."""
        return self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """Every parameter: embedding, L layers, the final norm (h), and the head unless tied."""
        head = 0 if self.tie_word_embeddings else self.embedding_params()
        return (
            self.embedding_params()
            + self.num_layers * self.layer_params()
            + self.hidden_size
            + head
        )


def model_shape_from_config(config: dict, where: str = "config.json") -> ModelShape:
    """The shape of a Hugging Face ``config.json`` (a dict); a missing key is named."""
    need = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)}: not a decoder-only transformer config"
        )
    heads = int(config["num_attention_heads"])
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or int(config["hidden_size"]) // heads,
        intermediate_size=config["intermediate_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def load_model_shape(path: str | Path) -> ModelShape:
    """The shape of a model directory's ``config.json``, or of that file itself."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (a model directory or its config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object")
    return model_shape_from_config(config, str(file))


class ClusterShape(BaseModel):
    """The machines a run gets. Memory in GiB (2**30 bytes), bandwidth in GB/s (1e9 bytes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    learner_gpus: int = Field(8, ge=1, le=100_000)
    """GPUs of the learner in all: the FSDP world size (torchrun ranks)."""
    learner_nodes: int = Field(1, ge=1, le=10_000)
    """Learner pods (torchrun nodes); it must divide learner_gpus."""
    gpu_memory_gib: float = Field(80.0, gt=0, le=100_000)
    """Memory of one GPU."""
    host_memory_gib: float = Field(1024.0, gt=0, le=1_000_000)
    """Host memory of one learner node."""
    rollout_gpus: int = Field(8, ge=1, le=100_000)
    """GPUs of the rollout workers in all."""
    tensor_parallel_size: int = Field(1, ge=1, le=1024)
    """GPUs one rollout engine spans (DAPO_VLLM_TENSOR_PARALLEL_SIZE); it must divide
    rollout_gpus, and rollout workers = rollout_gpus / tensor_parallel_size."""
    rollout_max_prompts: int = Field(8, ge=1, le=1_000_000)
    """Prompt tasks one rollout worker generates together (the chart's rollout.maxPrompts)."""
    rollout_max_batch_rows: int = Field(0, ge=0, le=10_000_000)
    """Cap on the sequences one worker decodes at once (rollout.maxBatchRows; 0 = none)."""
    reward_replicas: int = Field(2, ge=1, le=10_000)
    """Reward pods: each publishes scored groups on its own connection."""
    bandwidth_gb_s: float = Field(25.0, gt=0, le=1_000_000)
    """Learner-to-rollout network bandwidth the weights cross."""
    process_overhead_gib: float = Field(0.5, ge=0, le=1024)
    """Host memory of one learner process before any model or batch: the interpreter, torch
    and transformers (0.41 GiB resident on CPU); a CUDA process holds more, its driver's."""

    @model_validator(mode="after")
    def _divides(self) -> ClusterShape:
        if self.learner_gpus % self.learner_nodes:
            raise ValueError(
                f"learner_nodes ({self.learner_nodes}) must divide learner_gpus "
                f"({self.learner_gpus}): every node runs the same number of ranks"
            )
        if self.rollout_gpus % self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size ({self.tensor_parallel_size}) must divide rollout_gpus "
                f"({self.rollout_gpus}): every rollout worker spans tensor_parallel_size GPUs"
            )
        return self

    @property
    def gpus_per_node(self) -> int:
        """Learner ranks on one node."""
        return self.learner_gpus // self.learner_nodes

    @property
    def rollout_workers(self) -> int:
        """Rollout engines (pods), each spanning tensor_parallel_size GPUs."""
        return self.rollout_gpus // self.tensor_parallel_size
