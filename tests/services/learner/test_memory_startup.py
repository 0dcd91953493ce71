"""Start-up of the sharded learner on 2 gloo ranks (torchrun): the model is built on
``meta`` and only rank 0 reads the weight files, so rank 1's peak memory stays near its
half of the model instead of a whole copy; the sharded model then holds exactly the
file's weights, and tied embeddings stay one parameter.

Peaks are exact: each rank resets its resident-set high-water mark (``/proc/self/
clear_refs``) just before building and reads ``VmHWM`` after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset"
)


def qwen2_config(tied: bool, **size) -> Qwen2Config:
    """Qwen2's shape (GQA, SwiGLU, RMSNorm, rotary), scaled down."""
    shape = dict(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=14,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    shape.update(size)
    return Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=tied)


def save_random_model(path: Path, config: Qwen2Config, seed: int = 0) -> int:
    """A random model in ``path`` (float32 safetensors); its weight bytes."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reset_peak() -> float:
    """Resets this process's peak RSS to the current one; the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak RSS in MiB since the last ``reset_peak``."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


@pytest.fixture(scope="module")
def startup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("startup")
    big = save_random_model(root / "big", qwen2_config(tied=False))
    save_random_model(root / "tied", qwen2_config(True, vocab_size=64, hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(Path(__file__).resolve()), str(root)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((root / "result.json").read_text())
    result["model_mb"] = big / 2**20
    return result


def test_rank1_never_holds_the_whole_model(startup):
    model_mb, ranks = startup["model_mb"], startup["ranks"]
    assert model_mb > 150  # a model large enough for the figures to mean something
    shard = ranks["1"]["shard_mb"]
    assert 0.45 * model_mb < shard < 0.55 * model_mb  # rank 1 keeps half of the weights
    # start-up peak: its shards plus one tensor in flight, far from a whole model (which
    # loading and then sharding, as before, would need on every rank)
    assert ranks["1"]["peak_mb"] < 0.65 * model_mb, (ranks, model_mb)
    # rank 0 reads the files one small batch at a time: no whole copy either
    assert ranks["0"]["peak_mb"] < 0.75 * model_mb, (ranks, model_mb)


def test_sharded_model_holds_the_files_weights(startup):
    assert startup["max_diff"] == 0.0
    assert startup["checked"] > 100  # every tensor of the file compared
    assert startup["tied"] == {"same_parameter": True, "max_diff": 0.0}


def _local_mb(model: torch.nn.Module) -> float:
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def _file_diff(model: torch.nn.Module, source: Path, rank: int) -> tuple[float, int]:
    """Largest difference between the sharded model's full weights and the file's (rank 0;
    a collective per parameter)."""
    from safetensors import safe_open

    names = dict(model.named_parameters(remove_duplicate=False))
    diff, checked = 0.0, 0
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            full = names[key].full_tensor()
            if rank == 0:
                diff = max(diff, float((full - f.get_tensor(key)).abs().max()))
                checked += 1
    return diff, checked


def _worker(root: Path) -> None:
    import torch.distributed as dist

    from proto.runspec import RunSpec
    from services.learner import model_init
    from services.learner.model_init import load_sharded
    from services.learner.ranks import init_ranks

    torch.set_num_threads(1)
    ranks = init_ranks("cpu")
    model_init.LOAD_BATCH_BYTES = 16 << 20  # rank 0 reads at most 16 MiB at a time
    spec = RunSpec()
    # the tiny tied model first: it also loads every module the big one needs
    tied = load_sharded(root / "tied" if ranks.rank == 0 else None, spec, ranks,
                        frozen=False, weights=True)  # fmt: skip
    same = tied.lm_head.weight is tied.model.embed_tokens.weight
    tied_diff, _ = _file_diff(tied, root / "tied", ranks.rank)
    dist.barrier()
    before = reset_peak()
    source = root / "big" if ranks.rank == 0 else None  # rank 1 never sees the files
    model = load_sharded(source, spec, ranks, frozen=False, weights=True)
    mine = {"peak_mb": peak_mb() - before, "shard_mb": _local_mb(model)}
    figures = [None, None]
    dist.all_gather_object(figures, mine)
    max_diff, checked = _file_diff(model, root / "big", ranks.rank)
    if ranks.rank == 0:
        result = {
            "ranks": {str(r): f for r, f in enumerate(figures)},
            "max_diff": max_diff,
            "checked": checked,
            "tied": {"same_parameter": same, "max_diff": tied_diff},
        }
        (root / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
