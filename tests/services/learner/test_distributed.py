"""The FSDP2-sharded learner on 2 real CPU ranks (gloo, started by torchrun) against the
single-process trainer: same update, same versions, full-state gather and sharded
checkpoints that reload and resume exactly.

The worker half of this file runs under ``torchrun`` (``python -m torch.distributed.run``);
rank 0 also trains an unsharded copy, compares, and writes its findings to a JSON file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from services.learner.distributed import read_sharded_optimizer_state
from services.learner.policy import read_rank_optimizer_state
from services.learner.ranks import GroupRanks, SoloRanks, padded_share

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = [  # both deal 3 micro-batches over 2 ranks: rank 1 runs a dummy
    {"ppo_mini_batch_size": 4, "ppo_micro_batch_size": 6},
    {"ppo_mini_batch_size": 2, "ppo_micro_batch_size": 3},
]


def test_padded_share_deals_round_robin_and_pads():
    assert padded_share(5, 0, 2) == [0, 2, 4]
    assert padded_share(5, 1, 2) == [1, 3, None]
    assert padded_share(2, 2, 3) == [None]
    for n in range(9):
        shares = [padded_share(n, r, 3) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # same number of calls on every rank
        dealt = sorted(i for s in shares for i in s if i is not None)
        assert dealt == list(range(n))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text()), out


def test_two_ranks_give_the_single_process_update(two_rank_run):
    result, _ = two_rank_run
    assert len(result["configs"]) == len(CONFIGS)
    for r in result["configs"]:
        assert r["max_param_diff"] < 1e-10, r
        assert r["moved"] > 1e-4, r  # the batch did change the weights
        assert r["version"] == r["single_version"] == r["expected_version"], r
        for k in ("loss", "grad_norm", "entropy", "pg_clipfrac_high"):
            assert abs(r["figures"][k] - r["single_figures"][k]) < 1e-9, (k, r)


def test_sharded_checkpoint_reloads_and_resumes(two_rank_run):
    result, out = two_rank_run
    ckpt = Path(result["checkpoint"])
    assert {p.name for p in ckpt.glob("optimizer_rank*.pt")} == {
        "optimizer_rank0.pt",
        "optimizer_rank1.pt",
    }
    assert result["checkpoint_max_diff"] == 0.0  # HF files hold the gathered full weights
    assert result["resume_max_diff"] < 1e-12  # resumed run continues like the original
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 1
    with pytest.raises(RuntimeError, match="written by 2 learner rank"):
        read_sharded_optimizer_state(ckpt, state, GroupRanks(0, 3, "cpu"))
    with pytest.raises(RuntimeError, match="holds optimizer shards of 2 ranks"):
        read_rank_optimizer_state(ckpt, state, SoloRanks())  # one process cannot resume it


def _start_sharded_learner(stack, redis_url: str, index: int):
    """The learner service as 2 torchrun ranks, registered with the stack like the others."""
    from dapo.cli.stack import Proc
    from dapo.transport.redis_embed import free_port

    port = free_port()
    log_path = stack.run_dir / "logs" / f"learner-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        DAPO_REDIS_URL=redis_url,
        DAPO_RUN_ID=stack.run_id,
        DAPO_WORKER_ID=f"learner-{index}",
        DAPO_HEALTH_PORT=str(port),
        DAPO_PORT=str(port),
        DAPO_THREADS="1",
        DAPO_DEVICE="cpu",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    popen = subprocess.Popen(
        [*cmd, "-m", "dapo.cli", "service", "learner"],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = Proc("learner", f"learner-{index}", port, popen, log_path)
    stack.procs.append(proc)
    return proc


def _kill_session(popen: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # torchrun's ranks share its session
        os.killpg(popen.pid, signal.SIGKILL)


def test_learner_service_under_torchrun_stops_resumes_and_completes(tmp_path, redis_url):
    """The real services, the learner as 2 torchrun ranks: SIGTERM mid-run writes a sharded
    checkpoint, a new torchrun learner resumes from it, the run completes, every rollout
    worker holds the final weights bit for bit, and every rank exits by itself."""
    from dapo.cli.stack import Stack
    from dapo.runtime.runs import RunStore
    from dapo.weights.registry import stale_or_mismatched_workers
    from tests.e2e_helpers import (
        make_dataset,
        make_model_dir,
        metrics_lines,
        small_spec,
        wait_status,
    )

    runs = tmp_path / "runs"
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "train.jsonl"),
        runs,
        trainer={"total_training_steps": 5, "save_freq": 2, "runs_dir": str(runs)},
    )
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    stack = Stack(redis_url, run_id, runs / run_id, threads=1)
    for kind in ("sampler", "reward", "rollout"):
        stack.start(kind)
    first = _start_sharded_learner(stack, redis_url, 0)
    procs = [first]
    try:
        stack.wait_ready(timeout_s=120)
        store.set_status(run_id, "running")
        deadline = time.monotonic() + 120
        while not (stack.run_dir / "checkpoints" / "step_000002").is_dir():
            assert time.monotonic() < deadline, "no checkpoint at step 2"
            stack.check_alive()
            time.sleep(0.2)
        first.popen.send_signal(signal.SIGTERM)  # graceful: a final sharded checkpoint
        first.popen.wait(timeout=60)
        stack.procs.remove(first)
        procs.append(_start_sharded_learner(stack, redis_url, 1))
        assert wait_status(store, stack, run_id, {"completed", "failed"}) == "completed"
        state = store.state(run_id)
        assert state.step == 5 and state.policy_version == 5
        deadline = time.monotonic() + 30
        while (
            bad := stale_or_mismatched_workers(store.client, run_id, 5)
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert bad == {}
        assert procs[-1].popen.wait(timeout=60) == 0  # every rank stops once the run is done
    finally:
        stack.stop()
        for proc in procs:
            _kill_session(proc.popen)
    assert "resumed from" in procs[-1].log_path.read_text()
    assert sorted({r["batch_id"] for r in metrics_lines(stack.run_dir)}) == [0, 1, 2, 3, 4]
    final = stack.run_dir / "checkpoints" / "step_000005"
    assert (final / "optimizer_rank1.pt").is_file()
    AutoModelForCausalLM.from_pretrained(str(final))  # plain HF loading works


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _worker(out: Path) -> None:
    """One rank of the 2-rank run (under torchrun)."""
    import torch.distributed as dist

    from services.learner.distributed import (
        full_params,
        load_local_optimizer_state,
        save_sharded_checkpoint,
        shard_model,
    )
    from services.learner.ranks import init_ranks
    from services.learner.trainer import Trainer
    from tests.services.learner.test_trainer import rollout_batch, spec, tiny_model

    torch.set_num_threads(1)
    ranks = init_ranks("cpu")
    base = tiny_model(torch.float64)
    box = [rollout_batch(copy.deepcopy(base).float()) if ranks.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one batch, bit for bit, on both ranks
    batch = box[0]
    result: dict = {"configs": []}
    for cfg in CONFIGS:
        model = shard_model(copy.deepcopy(base))
        trainer = Trainer(model, spec(**cfg), "cpu", pad_id=0, ranks=ranks)
        figures = trainer.train_batch(batch)
        full = full_params(model)
        if ranks.rank == 0:
            single = copy.deepcopy(base)
            st = Trainer(single, spec(**cfg), "cpu", pad_id=0)
            single_figures = st.train_batch(batch)
            ref = {n: p.detach() for n, p in single.named_parameters()}
            start = {n: p.detach() for n, p in base.named_parameters()}
            result["configs"].append(
                {
                    "cfg": cfg,
                    "max_param_diff": _max_diff(full, ref),
                    "moved": _max_diff(full, start),
                    "version": trainer.version,
                    "single_version": st.version,
                    "expected_version": 1,  # one training step, however many mini-batches
                    "figures": figures,
                    "single_figures": single_figures,
                }
            )
    # checkpoint of the last config, then resume it and train on: both must agree
    ckpt = save_sharded_checkpoint(
        ranks, out / "checkpoints", 1, model, None, trainer.state(), trainer.optimizer
    )
    resumed_model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float64)
    loaded = {n: p.detach().clone() for n, p in resumed_model.named_parameters()}
    shard_model(resumed_model)
    resumed = Trainer(resumed_model, spec(**CONFIGS[-1]), "cpu", pad_id=0, ranks=ranks)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    load_local_optimizer_state(resumed.optimizer, read_sharded_optimizer_state(ckpt, state, ranks))
    resumed.load_state(state, None)
    trainer.train_batch(batch)
    resumed.train_batch(batch)
    after, after_resumed = full_params(model), full_params(resumed_model)
    if ranks.rank == 0:
        result.update(
            checkpoint=str(ckpt),
            checkpoint_max_diff=_max_diff(loaded, full),
            resume_max_diff=_max_diff(after, after_resumed),
        )
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
