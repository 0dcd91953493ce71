"""Model and cluster shapes: parameter counts against real models, errors naming fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dapo.sizing import ClusterShape, load_model_shape, model_shape_from_config

QWEN_32B = Path(__file__).resolve().parent / "qwen2.5-32b"


def _count(config) -> int:
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
        LlamaConfig(
            vocab_size=500,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=32,
        ),
    ],
    ids=["qwen2-tied-gqa", "qwen2-untied-mha", "llama-head-dim"],
)
def test_parameter_count_equals_the_real_models(config):
    shape = model_shape_from_config(config.to_dict())
    assert shape.num_params() == _count(config)


def test_qwen25_32b_fixture_has_its_public_shape_and_count():
    shape = load_model_shape(QWEN_32B)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads) == (
        5120,
        64,
        40,
        8,
    )
    assert (shape.intermediate_size, shape.vocab_size) == (27648, 152064)
    assert not shape.tie_word_embeddings and shape.attention_bias
    assert shape.num_params() == _count(AutoConfig.from_pretrained(QWEN_32B))
    assert load_model_shape(QWEN_32B / "config.json") == shape


def test_bad_model_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_shape(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8, "vocab_size": 10}))
    with pytest.raises(ValueError, match="num_hidden_layers, num_attention_heads"):
        load_model_shape(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_model_shape(bad)
    cfg = {
        "vocab_size": 10,
        "hidden_size": 12,
        "num_hidden_layers": 1,
        "num_attention_heads": 6,
        "num_key_value_heads": 4,
        "intermediate_size": 8,
    }
    with pytest.raises(ValidationError, match="num_key_value_heads"):
        model_shape_from_config(cfg)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"learner_gpus": 0}, "learner_gpus"),
        ({"gpu_memory_gib": -1}, "gpu_memory_gib"),
        ({"learner_gpus": 8, "learner_nodes": 3}, "learner_nodes (3) must divide learner_gpus"),
        ({"rollout_gpus": 6, "tensor_parallel_size": 4}, "tensor_parallel_size (4) must divide"),
        ({"bandwidth_gb_s": float("inf")}, "bandwidth_gb_s"),
        ({"gpus": 8}, "gpus"),
    ],
)
def test_bad_cluster_shapes_name_the_field(fields, named):
    with pytest.raises(ValidationError) as err:
        ClusterShape(**fields)
    assert named in str(err.value)


def test_cluster_derived_counts():
    c = ClusterShape(learner_gpus=16, learner_nodes=2, rollout_gpus=12, tensor_parallel_size=4)
    assert (c.gpus_per_node, c.rollout_workers) == (8, 3)
