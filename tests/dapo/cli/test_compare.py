"""``dapo compare``: two runs on one picture, one colour each, and a table of their final
figures named after each run."""

from __future__ import annotations

import pytest

from dapo.cli.compare import compare, final_figures, format_table
from dapo.cli.main import main as dapo
from dapo.cli.plots import HELD_OUT, load_run
from tests.dapo.cli.test_plots import PNG, make_run


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path, "naive-grpo", "20260101-120000-aaaa", steps=20, slope=0.005,
                 evals=[(0, 0.4), (10, 0.43), (20, 0.45)])  # fmt: skip
    b = make_run(tmp_path, "dapo", "20260101-130000-bbbb", steps=30, off_policy=False)
    return a, b


def test_two_runs_on_one_picture_and_one_table(two_runs, tmp_path):
    path, table = compare(two_runs, tmp_path / "out" / "compare.png", x="time")
    assert path.read_bytes()[:8] == PNG
    lines = table.splitlines()
    assert lines[0].startswith("| run | held-out before (acc/mean@4) | held-out after (acc/mean@4)")
    assert lines[2] == ("| naive-grpo (20260101-120000-aaaa) | 40.0% | 45.0% | +5.0 pt | 20 | "
                        "40.0 | 64.0 |")  # fmt: skip
    assert lines[3].startswith("| dapo (20260101-130000-bbbb) | 40.0% | 70.0% | +30.0 pt | 30 |")


def test_final_figures_without_a_summary(tmp_path):
    run = load_run(make_run(tmp_path, steps=10, summary=False))
    row = final_figures(run)
    assert row["held-out before"] is None and row["steps"] == 10
    # from the steps' timestamps: the last one minus the first step's start (its time less
    # its train_s), 2 s a step with 0.5 s of training in the first
    assert row["train time (s)"] == 18.5
    assert "| - | - | - | 10 | 18.5 | - |" in format_table([row])


def test_the_command_prints_the_table_and_writes_both_files(two_runs, tmp_path, capsys):
    out, md = tmp_path / "c.png", tmp_path / "c.md"
    assert dapo(["compare", *map(str, two_runs), "-o", str(out), "--table", str(md)]) == 0
    captured = capsys.readouterr()
    assert "naive-grpo (20260101-120000-aaaa)" in captured.out
    assert md.read_text().strip() == captured.out.strip()
    assert str(out) in captured.err and out.read_bytes()[:8] == PNG


def test_a_folder_without_steps_is_refused(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert dapo(["compare", str(two_runs[0]), str(empty), "-o", str(tmp_path / "x.png")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_held_out_panel_appears_when_any_run_has_evaluations(two_runs, tmp_path):
    from dapo.cli.plots import plot_runs

    titles = plot_runs(two_runs, tmp_path / "p.png").titles
    assert titles[0] == HELD_OUT and "importance weight proximal / behaviour" in titles


ROWS = ["naive-grpo", "overlong-filtering", "clip-higher", "soft-overlong", "token-level-loss",
        "dynamic-sampling"]  # fmt: skip
SWITCHES = [
    ("actor", "overlong_filter"),
    ("actor", "clip_ratio_high"),
    ("reward", "overlong_buffer", "enable"),
    ("actor", "loss_agg_mode"),
    ("algorithm", "filter_groups", "enable"),
]


def _section(tree: dict, path: tuple[str, ...]) -> dict:
    for part in path[:-1]:
        tree = tree[part]
    return tree


@pytest.mark.parametrize("row", ROWS)
def test_each_ablation_row_is_cpu_small_with_its_presets_switches(row):
    """``make ablation``'s rows: the paper's switches of configs/presets/<row>.yaml, and
    everything else (model, data, batch, optimiser, seed) cpu-small's, the same in every row."""
    from dapo.runtime.config import REPO_ROOT, load_run_spec

    got = load_run_spec(REPO_ROOT / "configs" / "ablation" / f"{row}.yaml", environ={})
    preset = load_run_spec(REPO_ROOT / "configs" / "presets" / f"{row}.yaml", environ={})
    spec, want = got.model_dump(), load_run_spec("cpu-small", environ={}).model_dump()
    for path in SWITCHES:
        value = _section(spec, path)[path[-1]]
        assert value == _section(preset.model_dump(), path)[path[-1]], path
        _section(want, path)[path[-1]] = value
    assert got.name == f"ablation-{row}"
    t = got.trainer
    assert t.runs_dir == "runs/ablation" and t.test_freq > 0
    assert t.test_freq % t.save_freq == 0  # every step evaluated has a checkpoint
    want["name"], want["trainer"] = spec["name"], spec["trainer"]
    assert spec == want
