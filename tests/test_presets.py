"""The ablation presets: valid RunSpecs, paper values, one technique added per row.

Each row after the first is an overlay that ``extends`` the previous one, so every
check here is made on the spec as ``load_run_spec`` resolves it, not on the file text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dapo.runtime.config import load_config_tree, load_run_spec
from proto.runspec import RunSpec

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"

# (file, paper's AIME 2024 score, the only switch that differs from the previous row)
ROWS: list[tuple[str, int, dict[str, Any]]] = [
    ("naive-grpo", 30, {}),
    ("overlong-filtering", 36, {"actor.overlong_filter": (False, True)}),
    ("clip-higher", 38, {"actor.clip_ratio_high": (0.2, 0.28)}),
    ("soft-overlong", 41, {"reward.overlong_buffer.enable": (False, True)}),
    ("token-level-loss", 42, {"actor.loss_agg_mode": ("seq-mean-token-mean", "token-mean")}),
    ("dynamic-sampling", 50, {"algorithm.filter_groups.enable": (False, True)}),
]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _load(name: str) -> tuple[str, RunSpec]:
    path = PRESETS / f"{name}.yaml"
    return path.read_text(), load_run_spec(path, overrides=(), environ={})


def test_exactly_the_ablation_files_exist() -> None:
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(r[0] for r in ROWS)


@pytest.mark.parametrize(("name", "score", "_switch"), ROWS)
def test_resolved_preset_carries_reference_values(name: str, score: int, _switch) -> None:
    text, spec = _load(name)
    assert spec.name == f"dapo-ablation-{name}"
    assert re.search(rf"AIME 2024 score for this row \(avg@32\): {score}\b", text)
    assert spec.model.path == "Qwen/Qwen2.5-32B"
    assert spec.data.train_files == ["dapo-math-17k.parquet"]
    assert spec.data.val_files == ["aime-2024.parquet"]
    assert spec.data.train_batch_size == 512 and spec.rollout.n == 16
    assert spec.actor.ppo_mini_batch_size == 32
    opt = spec.actor.optim
    assert (opt.lr, opt.lr_warmup_steps, opt.weight_decay, opt.grad_clip) == (1e-6, 20, 0.1, 1.0)
    assert (spec.rollout.temperature, spec.rollout.top_p) == (1.0, 1.0)
    assert spec.rollout.val_kwargs.model_dump() == {"temperature": 1.0, "top_p": 0.7, "n": 32}
    assert spec.data.max_response_length == 20480
    assert spec.reward.overlong_buffer.len == 4096
    assert spec.actor.clip_ratio_c == 10.0 and spec.actor.clip_ratio_low == 0.2
    assert not spec.actor.use_kl_loss and spec.actor.kl_loss_coef == 0.0
    assert spec.actor.entropy_coeff == 0.0
    assert spec.algorithm.filter_groups.metric == "acc"
    assert spec.rollout.dtype == "bfloat16"  # verl's vLLM rollouts of the paper's runs


@pytest.mark.parametrize("name", [r[0] for r in ROWS])
def test_every_row_is_synchronous_and_on_policy(name: str) -> None:
    # the paper trains synchronously: no stale sample, and the PPO anchor is the
    # learner's recomputed log-probs with no correction towards the rollout's
    text, spec = _load(name)
    assert spec.algorithm.max_staleness == 0
    corr = spec.algorithm.rollout_correction
    assert not corr.bypass_mode and corr.rollout_is is None and corr.rollout_rs is None
    assert corr.rollout_token_veto_threshold is None
    if name == "naive-grpo":
        assert "max_staleness 0 (synchronous" in text


@pytest.mark.parametrize("name", [r[0] for r in ROWS])
def test_resolved_preset_never_falls_back_on_code_defaults(name: str) -> None:
    # the extends chain states every field, so a changed default cannot move a row
    _, spec = _load(name)
    resolved = load_config_tree(PRESETS / f"{name}.yaml")
    assert set(_flatten(resolved)) == set(_flatten(spec.model_dump()))


@pytest.mark.parametrize("index", range(1, len(ROWS)))
def test_each_row_file_states_only_its_base_name_and_switch(index: int) -> None:
    raw = yaml.safe_load((PRESETS / f"{ROWS[index][0]}.yaml").read_text())
    assert raw.pop("extends") == f"{ROWS[index - 1][0]}.yaml"
    assert set(_flatten(raw)) == {"name", *ROWS[index][2]}


def test_naive_grpo_switches() -> None:
    _, spec = _load("naive-grpo")
    assert spec.actor.clip_ratio_high == spec.actor.clip_ratio_low == 0.2
    assert spec.actor.loss_agg_mode == "seq-mean-token-mean"
    assert not spec.actor.overlong_filter
    assert not spec.reward.overlong_buffer.enable
    assert not spec.algorithm.filter_groups.enable


@pytest.mark.parametrize("index", range(1, len(ROWS)))
def test_each_row_adds_exactly_its_technique(index: int) -> None:
    prev_name, _, _ = ROWS[index - 1]
    name, _, switch = ROWS[index]
    prev = _flatten(_load(prev_name)[1].model_dump())
    cur = _flatten(_load(name)[1].model_dump())
    changed = {k: (prev[k], cur[k]) for k in cur if prev[k] != cur[k] and k != "name"}
    assert changed == switch
