"""Run specs load from YAML + env + overrides, and bad values are named before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dapo.runtime.config import ConfigError, load_config_tree, load_run_spec

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    spec = load_run_spec(path, environ={})
    assert spec.data.train_batch_size % spec.actor.ppo_mini_batch_size == 0


def test_paper_recipe_values():
    spec = load_run_spec("dapo-qwen2.5-32b", environ={})
    assert (spec.data.train_batch_size, spec.rollout.n, spec.actor.ppo_mini_batch_size) == (
        512,
        16,
        32,
    )
    assert (spec.actor.clip_ratio_low, spec.actor.clip_ratio_high, spec.actor.clip_ratio_c) == (
        0.2,
        0.28,
        10.0,
    )
    assert spec.actor.loss_agg_mode == "token-mean"
    assert spec.actor.optim.lr == 1e-6 and spec.actor.optim.weight_decay == 0.1
    assert spec.reward.overlong_buffer.len == 4096 and spec.data.max_response_length == 20480
    assert spec.algorithm.filter_groups.enable and spec.algorithm.filter_groups.metric == "acc"
    assert spec.rollout.val_kwargs.top_p == 0.7 and spec.rollout.val_kwargs.n == 32
    # the paper's synchronous on-policy schedule: no stale sample, no correction
    assert spec.algorithm.max_staleness == 0
    corr = spec.algorithm.rollout_correction
    assert not corr.bypass_mode and corr.rollout_is is None and corr.rollout_rs is None
    assert spec.actor.optim.lr_warmup_steps == 20  # training steps
    assert spec.rollout.dtype == "bfloat16" and spec.rollout.engine == "vllm"


def test_async_recipe_is_the_paper_recipe_with_a_correction():
    base = load_run_spec("dapo-qwen2.5-32b", environ={}).model_dump()
    spec = load_run_spec("dapo-qwen2.5-32b-async", environ={})
    assert spec.algorithm.max_staleness == 2
    corr = spec.algorithm.rollout_correction
    assert not corr.bypass_mode and corr.rollout_is == "token"
    assert corr.rollout_is_threshold == 2.0 and corr.rollout_rs is None
    dumped = spec.model_dump()
    for section, key in (("algorithm", "max_staleness"), ("algorithm", "rollout_correction")):
        dumped[section].pop(key), base[section].pop(key)
    assert dumped.pop("name") == "dapo-qwen2.5-32b-async" and base.pop("name")
    assert dumped == base
    header = (CONFIGS / "dapo-qwen2.5-32b-async.yaml").read_text().split("\n", 1)[0]
    assert header.startswith("#")


def test_cpu_small_corrects_its_stale_samples():
    spec = load_run_spec("cpu-small", environ={})
    assert spec.algorithm.max_staleness == 1
    corr = spec.algorithm.rollout_correction
    assert (corr.bypass_mode, corr.rollout_is, corr.rollout_is_threshold) == (False, "token", 2.0)
    assert spec.rollout.dtype == "float32"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("actor.recompute_old_log_prob=false", ["algorithm.rollout_correction.bypass_mode: true"]),
        (
            "actor.tis_imp_ratio_cap=2.0",
            ["algorithm.rollout_correction.rollout_is: token", "rollout_is_threshold: c"],
        ),
    ],
)
def test_removed_actor_fields_name_their_replacement(override, names):
    with pytest.raises(ConfigError) as err:
        load_run_spec("cpu-small", [override], environ={})
    assert "was removed" in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_stale_samples_need_an_objective_that_uses_the_behaviour_policy():
    ignore = "algorithm.rollout_correction.rollout_is=null"
    with pytest.raises(ConfigError) as err:
        load_run_spec("cpu-small", [ignore], environ={})
    msg = str(err.value)
    for part in (
        "algorithm.max_staleness is 1",
        "algorithm.rollout_correction.rollout_is: token",
        "bypass_mode: true",
        "max_staleness: 0",
    ):
        assert part in msg, part
    # each way out validates
    load_run_spec("cpu-small", [ignore, "algorithm.max_staleness=0"], environ={})
    load_run_spec(
        "cpu-small", [ignore, "algorithm.rollout_correction.bypass_mode=true"], environ={}
    )
    load_run_spec("cpu-small", [ignore, "algorithm.rollout_correction.rollout_rs=geometric"],
                  environ={})  # fmt: skip


def test_bypass_mode_refuses_weights_and_rejection():
    for extra in ("rollout_is=token", "rollout_rs=token", "rollout_token_veto_threshold=1e-4"):
        with pytest.raises(ConfigError, match="bypass_mode: true with") as err:
            load_run_spec(
                None,
                ["algorithm.rollout_correction.bypass_mode=true",
                 f"algorithm.rollout_correction.{extra}"],
                environ={},
            )  # fmt: skip
        assert "PPO anchor" in str(err.value)
    # in bypass mode rollout_is defaults to null
    spec = load_run_spec(None, ["algorithm.rollout_correction.bypass_mode=true"], environ={})
    assert spec.algorithm.rollout_correction.rollout_is is None


@pytest.mark.parametrize(
    "override",
    [
        "rollout_is_threshold=.inf",
        "rollout_is_threshold=.nan",
        "rollout_is_threshold=0",
        "rollout_is_threshold=1e7",
        "rollout_rs_threshold=-1",
        "rollout_rs_threshold_lower=.inf",
        "rollout_token_veto_threshold=2",
        "rollout_is=tokens",
        "rollout_rs=seq",
    ],
)
def test_correction_values_are_finite_bounded_and_named(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_run_spec("cpu-small", [f"algorithm.rollout_correction.{override}"], environ={})
    assert f"algorithm.rollout_correction.{field}" in str(err.value)


def test_rejection_band_must_not_be_empty():
    band = ["algorithm.rollout_correction.rollout_rs_threshold=1.5",
            "algorithm.rollout_correction.rollout_rs_threshold_lower=1.6"]  # fmt: skip
    with pytest.raises(ConfigError, match="rollout_rs_threshold_lower"):
        load_run_spec("cpu-small", [*band, "algorithm.rollout_correction.rollout_rs=token"],
                      environ={})  # fmt: skip
    load_run_spec("cpu-small", band, environ={})  # no rejection: the band is not used
    # a truncation below 1 is allowed; with rejection off its reciprocal band is not checked
    load_run_spec("cpu-small", ["algorithm.rollout_correction.rollout_is_threshold=0.5"],
                  environ={})  # fmt: skip


def test_overrides_env_then_cli(tmp_path):
    env = {"DAPO_SPEC__ACTOR__CLIP_RATIO_HIGH": "0.3", "DAPO_SPEC__ROLLOUT__N": "4"}
    spec = load_run_spec("cpu-small", ["rollout.n=6", "actor.optim.lr=2e-5"], environ=env)
    assert spec.actor.clip_ratio_high == 0.3
    assert spec.rollout.n == 6  # command line beats environment
    assert spec.actor.optim.lr == 2e-5


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("actor.clip_ratio_low=1.5", "actor.clip_ratio_low"),
        ("actor.loss_agg_mode=mean", "actor.loss_agg_mode"),
        ("rollout.n=1", "rollout.n"),
        ("algorithm.filter_groups.metric=loss", "algorithm.filter_groups.metric"),
        ("reward.overlong_buffer.penalty_factor=-1", "reward.overlong_buffer.penalty_factor"),
        ("actor.clip_ratio_hgh=0.3", "actor.clip_ratio_hgh"),
    ],
)
def test_invalid_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_run_spec("cpu-small", [override], environ={})
    assert field in str(err.value)


def test_cross_field_rule_is_explained():
    with pytest.raises(ConfigError, match="ppo_mini_batch_size must divide"):
        load_run_spec(None, ["data.train_batch_size=10", "actor.ppo_mini_batch_size=4"], environ={})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_spec(bad, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_run_spec(tmp_path / "nope.yaml", environ={})


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_overlay_over_base(tmp_path):
    _write(
        tmp_path / "base.yaml",
        "name: base\nrollout: {n: 4, top_p: 0.9}\nactor: {clip_ratio_high: 0.2}\n",
    )
    overlay = _write(
        tmp_path / "overlay.yaml", "extends: base.yaml\nname: overlay\nrollout: {n: 8}\n"
    )
    spec = load_run_spec(overlay, environ={})
    assert spec.name == "overlay"
    assert (spec.rollout.n, spec.rollout.top_p) == (8, 0.9)  # sibling key of the base kept
    assert spec.actor.clip_ratio_high == 0.2
    assert "extends" not in load_config_tree(overlay)


def test_extends_chain_then_env_and_cli_overrides(tmp_path):
    _write(tmp_path / "a.yaml", "rollout: {n: 4, top_p: 0.9, temperature: 0.5}\n")
    _write(tmp_path / "b.yaml", "extends: a\nrollout: {top_p: 0.8}\n")  # .yaml may be left off
    c = _write(tmp_path / "c.yaml", "extends: b.yaml\nrollout: {temperature: 0.7}\n")
    spec = load_run_spec(c, environ={})
    assert (spec.rollout.n, spec.rollout.top_p, spec.rollout.temperature) == (4, 0.8, 0.7)
    env = {"DAPO_SPEC__ROLLOUT__N": "6"}
    spec = load_run_spec(c, ["rollout.top_p=0.5"], environ=env)
    assert (spec.rollout.n, spec.rollout.top_p) == (6, 0.5)


def test_extends_is_relative_to_the_extending_file_or_a_config_name(tmp_path, monkeypatch):
    _write(tmp_path / "shared" / "base.yaml", "rollout: {n: 4}\n")
    deep = _write(tmp_path / "runs" / "x" / "run.yaml", "extends: ../../shared/base.yaml\n")
    monkeypatch.chdir(tmp_path / "runs")  # not where the base is: the file's folder counts
    assert load_run_spec(deep, environ={}).rollout.n == 4
    named = _write(tmp_path / "named.yaml", "extends: cpu-small\nrollout: {n: 3}\n")
    spec = load_run_spec(named, environ={})
    assert spec.rollout.n == 3
    assert spec.model == load_run_spec("cpu-small", environ={}).model


def test_extends_cycle_names_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_run_spec(tmp_path / "a.yaml", environ={})
    assert str(err.value).count("a.yaml") == 2 and "b.yaml" in str(err.value)
    _write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_run_spec(tmp_path / "self.yaml", environ={})


@pytest.mark.parametrize(
    ("extends", "match"),
    [
        ("missing.yaml", "'missing.yaml': base file not found"),
        ("3", "non-empty path string"),
        ('""', "non-empty"),
    ],
)
def test_extends_errors_name_the_file(tmp_path, extends, match):
    cfg = _write(tmp_path / "overlay.yaml", f"extends: {extends}\nrollout: {{n: 4}}\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_run_spec(cfg, environ={})
    assert "overlay.yaml" in str(err.value)


def test_base_with_bad_yaml_is_named(tmp_path):
    _write(tmp_path / "base.yaml", "actor: [1, 2\n")
    overlay = _write(tmp_path / "overlay.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: not valid YAML"):
        load_run_spec(overlay, environ={})


def test_cli_validate_rejects_bad_field_before_starting():
    proc = subprocess.run(
        [sys.executable, "-m", "dapo.cli", "validate", "-c", "cpu-small", "rollout.temperature=0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "rollout.temperature" in proc.stderr


def test_cli_help_is_fast_and_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dapo.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for cmd in ("up", "service", "score", "eval"):
        assert cmd in proc.stdout
    heavy = [m for m in ("torch", "transformers", "redis", "pydantic") if f" {m}\n" in proc.stderr]
    assert heavy == [], f"--help imported heavy modules: {heavy}"


def test_uncorrected_staleness_needs_saying_so():
    uncorrected = ["algorithm.rollout_correction.rollout_is=null"]
    with pytest.raises(ConfigError, match="ignores the policy that generated them"):
        load_run_spec("cpu-small", uncorrected, environ={})
    spec = load_run_spec(
        "cpu-small",
        [*uncorrected, "algorithm.rollout_correction.allow_uncorrected_staleness=true"],
        environ={},
    )
    assert (
        spec.algorithm.max_staleness == 1 and spec.algorithm.rollout_correction.rollout_is is None
    )
