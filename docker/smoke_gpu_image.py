"""Import smoke test of the GPU image, its last build step (no GPU needed).

Checks that torch and vLLM are the versions ``requirements-gpu.txt`` (beside this file) pins,
that torch is a CUDA build of the base image's CUDA major (``--cuda-major``, else the major
of ``CUDA_VERSION``, which the nvidia/cuda images set) with NCCL, and that every module the
GPU services load imports. Prints each problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

MODULES = (
    "transformers",
    "vllm",
    "dapo.engines.hf",
    "dapo.engines.vllm",
    "dapo.weights.sender",
    "dapo.weights.receiver",
    "services.learner.main",
    "services.rollout.main",
    "dapo.cli.main",
)
"""What the rollout and learner pods import (vLLM's own entry, our engines and services)."""


def pins(path: Path) -> dict[str, str]:
    """name -> version of the ``name==version`` lines of a requirement file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def check_versions(expected: dict[str, str], cuda_major: int | None) -> list[str]:
    import torch
    import vllm

    problems = []
    torch_public = torch.__version__.split("+", 1)[0]
    if "torch" in expected and torch_public != expected["torch"]:
        problems.append(f"torch {torch.__version__}, requirements-gpu.txt pins {expected['torch']}")
    if "vllm" in expected and vllm.__version__.split("+", 1)[0] != expected["vllm"]:
        problems.append(f"vllm {vllm.__version__}, requirements-gpu.txt pins {expected['vllm']}")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif cuda_major is not None and int(torch.version.cuda.split(".")[0]) != cuda_major:
        problems.append(
            f"torch built for CUDA {torch.version.cuda}, the image has CUDA {cuda_major}"
        )
    if not torch.distributed.is_nccl_available():
        problems.append("torch.distributed has no NCCL backend")
    return problems


def check_imports() -> list[str]:
    problems = []
    modules = list(MODULES)
    if importlib.util.find_spec("flashinfer") is not None:
        modules.append("flashinfer")
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import is what this test is for
            problems.append(f"import {name}: {type(exc).__name__}: {exc}")
        else:
            print(f"imported {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda-major", type=int, help="CUDA major torch must be built for")
    parser.add_argument(
        "--requirements", type=Path, default=Path(__file__).with_name("requirements-gpu.txt")
    )
    args = parser.parse_args(argv)
    cuda = args.cuda_major
    if cuda is None and os.environ.get("CUDA_VERSION"):
        cuda = int(os.environ["CUDA_VERSION"].split(".")[0])
    problems = check_versions(pins(args.requirements), cuda) + check_imports()
    for p in problems:
        print(f"GPU image smoke test: {p}", file=sys.stderr)
    print("GPU image smoke test: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
