"""``dapo plan``: the table, the JSON, the Helm values, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dapo.cli.main import main
from dapo.runtime.config import load_run_spec
from dapo.sizing import ClusterShape, chart_values, load_model_shape, make_plan

QWEN_32B = Path(__file__).resolve().parents[1] / "sizing" / "qwen2.5-32b"
BASE = ["plan", "--config", "configs/dapo-qwen2.5-32b.yaml", "--model-config", str(QWEN_32B)]


def test_table_names_every_section(capsys):
    assert main(BASE) == 0
    out = capsys.readouterr().out
    for title in (
        "learner GPU",
        "learner host",
        "rollout GPU",
        "Redis",
        "AOF volume",
        "weights per update",
        "32,763,876,352 parameters",
        "warning: ",
    ):
        assert title in out, title


def test_json_is_the_plan_of_the_flags(capsys):
    assert (
        main(
            [
                *BASE,
                "--learner-gpus",
                "16",
                "--learner-nodes",
                "2",
                "--response-tokens",
                "4096",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    spec = load_run_spec("configs/dapo-qwen2.5-32b.yaml")
    cluster = ClusterShape(learner_gpus=16, learner_nodes=2)
    from dapo.sizing import Workload

    want = make_plan(spec, load_model_shape(QWEN_32B), cluster, Workload(response_tokens=4096))
    assert got == json.loads(json.dumps(want))
    assert got["workload"]["response_tokens"] == 4096


def test_values_are_the_chart_values(capsys):
    assert main([*BASE, "--rollout-gpus", "16", "--tensor-parallel-size", "8", "--values"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    cluster = ClusterShape(rollout_gpus=16, tensor_parallel_size=8)
    spec = load_run_spec("configs/dapo-qwen2.5-32b.yaml")
    assert got == chart_values(make_plan(spec, load_model_shape(QWEN_32B), cluster), cluster)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--learner-gpus", "8", "--learner-nodes", "3"],
            "learner_nodes (3) must divide learner_gpus",
        ),
        (["--learner-gpus", "0"], "learner_gpus: Input should be greater than or equal to 1"),
        (["--rollout-gpus", "4", "--tensor-parallel-size", "8"], "tensor_parallel_size (8)"),
        (["--keep-rate", "0"], "invalid workload:\n  keep_rate"),
        (["--gpu-memory-gib", "nan"], "gpu_memory_gib"),
    ],
)
def test_bad_shapes_are_refused_naming_the_field(flags, says, capsys):
    assert main([*BASE, *flags]) == 2
    assert says in capsys.readouterr().err


def test_model_shape_comes_from_model_path_or_says_why(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(QWEN_32B / "config.json", model / "config.json")
    base = ["plan", "--config", "configs/dapo-qwen2.5-32b.yaml", f"model.path={model}", "--json"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["model"]["params"] == 32_763_876_352
    (model / "config.json").unlink()
    assert main(base) == 2
    assert "no config.json" in capsys.readouterr().err
    assert (
        main(
            [
                "plan",
                "--config",
                "configs/dapo-qwen2.5-32b.yaml",
                "--model-config",
                str(tmp_path / "nowhere.json"),
            ]
        )
        == 2
    )
    assert "nowhere.json does not exist" in capsys.readouterr().err
