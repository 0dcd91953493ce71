"""``make gpu-check`` (bench/gpu_check.py) on a machine without a GPU: its arguments, the
clear refusal without CUDA, the model it measures (shape and size), its throughput code at
a tiny size on CPU, the selection of the GPU-marked tests and the reading of their results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Workload

ROOT = Path(__file__).resolve().parents[1]
TINY = Workload(prompts=2, n=4, prompt_len=8, new_tokens=6, micro_batch=4)


def test_arguments_and_their_errors(capsys):
    args = gpu_check.parse_args([])
    assert (args.repeats, args.size, args.out) == (3, "0.5b", ROOT / ".bench" / "gpu.json")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--size", "7b"])
    assert "invalid choice: '7b'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_exits_with_a_clear_message_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == gpu_check.NO_CUDA_EXIT, proc.stderr
    assert "no CUDA GPU visible" in proc.stderr and "set GPU_PYTHON" in proc.stderr
    assert f"torch {torch.__version__}" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_the_measured_model_has_qwen2_5_0_5b_shape():
    assert gpu_check.param_count("0.5b") == 494_032_768  # Qwen2.5-0.5B's parameter count
    cfg = gpu_check.qwen2_config("0.5b")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (
        14, 2, True,
    )  # fmt: skip
    gpu_check.learner_spec(Workload())  # the measured workload is a valid run spec


def test_throughput_code_runs_at_a_tiny_size_on_cpu():
    model = gpu_check.build_model("tiny", "cpu")
    assert sum(p.numel() for p in model.parameters()) == gpu_check.param_count("tiny")
    assert model.dtype == torch.float32
    gen, batch = gpu_check.bench_generation(model, "cpu", TINY, repeats=2)
    assert model.dtype == torch.float32  # the engine worked on a bf16 copy
    assert len(batch.groups) == TINY.prompts and all(len(g.samples) == TINY.n for g in batch.groups)
    learn = gpu_check.bench_learner(model, "cpu", batch, TINY, repeats=2)
    for figures, name in (
        (gen, "gpu.generation_tokens_per_s"),
        (learn, "gpu.learner_tokens_per_s"),
    ):
        assert 0 < figures[f"{name}_min"] <= figures[name] <= figures[f"{name}_max"]


def test_scored_batches_carry_an_advantage_in_every_group():
    model = gpu_check.build_model("tiny", "cpu")
    _, batch = gpu_check.bench_generation(model, "cpu", TINY, repeats=1)
    for g in batch.groups:
        assert {s.score for s in g.samples} == {1.0, -1.0}
        assert all(s.length == len(s.response_ids) for s in g.samples)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_it_runs_the_gpu_marked_tests_only_and_reads_their_outcomes():
    files = gpu_check.gpu_test_files()
    assert {"tests/gpu/test_learner_cuda.py", "tests/gpu/test_fsdp_cuda.py"} <= set(files)
    assert "tests/test_gpu_check.py" not in files
    result = gpu_check.run_gpu_tests(timeout_s=280)  # no GPU here: every one skips
    assert result["ok"] and result["passed"] == result["failed"] == result["error"] == 0
    cases = result["cases"]
    assert result["skipped"] == len(cases) and set(cases.values()) == {"skipped"}
    for name in ("test_one_fsdp_rank_with_nccl", "test_bf16_training_step_on_cuda",
                 "test_logprobs_equal_teacher_forced_recompute_cuda",
                 "test_stack_on_two_gpus_trains_and_syncs_weights_over_nccl"):  # fmt: skip
        assert any(name in c for c in cases), name
    assert not any("test_seed_determinism" in c for c in cases)  # CPU-only tests stay out


def test_junit_outcomes_are_read_per_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert False\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n"
    )
    xml = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
         "-o", "addopts=", str(tmp_path / "test_sample.py")],
        cwd=tmp_path, capture_output=True, timeout=120,
    )  # fmt: skip
    cases = gpu_check._junit_cases(xml)
    assert sorted(cases.values()) == ["failed", "passed", "skipped"]
    assert cases["test_sample::test_bad"] == "failed"
