"""The chaos suite (``make test-chaos``): a whole run as real processes over a real Redis
with the chart's append-only persistence, while every service is killed with SIGKILL at
seeded random moments, more than once, and restarted as Kubernetes would (the same worker
id by the supervisor, and a fresh one); Redis is killed and started again, and frozen;
poison goes into every stream; a second learner is started for the run; the checkpoint
disk (a tmpfs of the run's own, where it can be mounted) fills up. Afterwards the run
has reached its step count, every dispatched prompt is accounted for exactly once, no
group was trained twice, no process is stuck, and the learner resumed from a checkpoint
with a consistent policy version. The figures are printed.

``DAPO_CHAOS_SEED`` picks the moments, ``DAPO_CHAOS_STEPS`` the run's length and
``DAPO_CHAOS_FREEZE_S`` how long Redis stops answering."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from dapo.cli.stack import Proc, RestartPolicy, Stack
from dapo.runtime.runs import RunStore
from proto.keys import run_key
from tests.chaos.harness import (
    DEAD_LETTERED,
    BatchObserver,
    ChaosRedis,
    inject,
    prompts_on_streams,
)
from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]

SEED = int(os.environ.get("DAPO_CHAOS_SEED", "13"))
STEPS = int(os.environ.get("DAPO_CHAOS_STEPS", "40"))
FREEZE_S = float(os.environ.get("DAPO_CHAOS_FREEZE_S", "10"))
TIMEOUT_S = 1200.0


def plan(rng: random.Random) -> list[str]:
    """What happens, in a seeded order after two injections of poison: two kills of every
    service restarted under its own id, one rollout and one reward worker replaced by a
    fresh id, Redis killed and frozen, a second learner, the checkpoint disk filled up."""
    kills = [f"kill {w}" for w in ("sampler-0", "reward-0", "rollout-0", "learner-0")] * 2
    events = kills + ["replace rollout-1", "replace reward-0", "kill redis", "freeze redis",
                      "second learner", "fill disk"]  # fmt: skip
    rng.shuffle(events)
    # poison early, so that every entry is consumed (and must be set aside) before the end
    return ["poison", "poison", *events]


class Chaos:
    def __init__(self, stack: Stack, store: RunStore, server: ChaosRedis, rng: random.Random,
                 small_disk: bool) -> None:  # fmt: skip
        self.stack, self.store, self.server, self.rng = stack, store, server, rng
        self.small_disk = small_disk
        """The run's folder is a small tmpfs of its own, which "fill disk" fills."""
        self.figures: Counter[str] = Counter()
        self.fresh = {"rollout": 2, "reward": 1}
        self.injections = 0

    def proc(self, worker_id: str) -> Proc | None:
        """The process of ``worker_id``, or when it was replaced, its kind's first one."""
        kind = worker_id.rsplit("-", 1)[0]
        named = [p for p in self.stack.procs if p.worker_id == worker_id]
        same_kind = [p for p in self.stack.procs if p.kind == kind]
        return (named or same_kind or [None])[0]

    def do(self, event: str) -> None:
        action, _, target = event.partition(" ")
        if action == "kill" and target == "redis":
            self.server.kill9()
            time.sleep(self.rng.uniform(0.5, 3.0))
            self.server.start()
            self.figures["redis kills"] += 1
        elif action == "freeze":
            self.server.freeze(FREEZE_S)
            self.figures["redis frozen (s)"] += FREEZE_S
        elif action == "kill":
            p = self.proc(target)
            if p is None or p.popen.poll() is not None:
                return  # already dead: the supervisor brings it back
            os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait()
            self.figures[f"kills of {p.worker_id}"] += 1
        elif action == "replace":  # the pod is gone; its Deployment starts one with a new name
            p = self.proc(target)
            if p is None:
                return
            if p.popen.poll() is None:
                os.kill(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
            self.stack.procs.remove(p)
            kind = p.kind
            self.stack.start(kind, self.fresh[kind])
            self.figures[f"kills of {target}"] += 1
            self.figures[f"fresh {kind}-{self.fresh[kind]}"] += 1
            self.fresh[kind] += 1
        elif action == "fill":
            if self.small_disk:
                fill_disk(self.stack.run_dir)
                self.figures["disk filled"] += 1
        elif action == "second":
            self.stack.start("learner", 1)
            self.figures["second learners"] += 1
        elif action == "poison":
            self.figures["poison entries"] += inject(self.server_client(), self.stack.run_id,
                                                     self.injections)  # fmt: skip
            self.injections += 1

    def server_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

    def supervise(self) -> None:
        def restarted(p: Proc) -> None:
            self.figures["restarts"] += 1
            try:
                self.store.record_restart(self.stack.run_id, p.worker_id)
            except redis.RedisError:
                pass  # Redis is the thing being broken right now

        self.stack.supervise(restarted)

    def status(self) -> tuple[str, int] | None:
        try:
            state = self.store.state(self.stack.run_id)
        except redis.RedisError:
            return None
        return state.status, state.step


def mount_small_disk(path: Path, size: str = "64m") -> bool:
    """A tmpfs of ``size`` at ``path`` (needs root); False when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def fill_disk(run_dir: Path) -> None:
    """Fill the run's disk until room for half a checkpoint is left: the next save runs out
    of space until the learner prunes down to its newest checkpoint, and so does every
    third one after it (only on a disk of the run's own: filling another would fill the
    machine's)."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    size = sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else 0
    free = shutil.disk_usage(run_dir).free
    with (run_dir.parent / "filler").open("wb") as f:
        f.write(b"\0" * max(free - size // 2, 0))


def run_chaos(chaos: Chaos, events: list[str]) -> tuple[str, list[str]]:
    """Once training has begun, one event every 0.5 to 2 seconds (seeded), supervising all
    along: the blows land early, overlapping, and the rest of the run shows it recovered.
    The final status, and the events the run finished too soon for."""
    deadline = time.monotonic() + TIMEOUT_S
    next_at = None
    while time.monotonic() < deadline:
        chaos.supervise()
        now = chaos.status()
        if now is not None:
            status, step = now
            if status in ("completed", "failed", "stopped"):
                return status, events
            if step >= 1 and next_at is None:
                next_at = time.monotonic()
            if events and next_at is not None and time.monotonic() >= next_at:
                event = events.pop(0)
                print(f"chaos: step {step}: {event}", flush=True)
                chaos.do(event)
                next_at = time.monotonic() + chaos.rng.uniform(0.5, 2.0)
        time.sleep(0.2)
    raise AssertionError(f"the run did not finish in {TIMEOUT_S:.0f}s; events left: {events}")


def test_a_run_survives_chaos_exactly_once(tmp_path):
    rng = random.Random(SEED)
    server = ChaosRedis(tmp_path / "redis").start()
    runs = tmp_path / "runs"
    small_disk = mount_small_disk(runs)
    model = make_model_dir(tmp_path / "model")
    spec = small_spec(
        model,
        make_dataset(tmp_path / "train.jsonl", n=24),
        runs,
        trainer={"total_training_steps": STEPS, "save_freq": 2, "runs_dir": str(runs)},
    )
    store = RunStore(redis.Redis.from_url(server.url, socket_timeout=5.0))
    run_id = store.create(spec).run_id
    stack = Stack(server.url, run_id, runs / run_id, threads=1)
    stack.restart = RestartPolicy(max_restarts=40, backoff_s=0.5, max_backoff_s=4.0)
    observer = BatchObserver(server.url, run_id)
    observer.start()
    chaos = Chaos(stack, store, server, rng, small_disk)
    events = plan(rng)
    try:
        for kind in ("sampler", "reward", "learner"):
            stack.start(kind)
        for i in range(2):
            stack.start("rollout", i)
        stack.wait_ready(timeout_s=300)
        store.set_status(run_id, "running")
        status, left = run_chaos(chaos, list(events))
        stuck = wait_for_exits(stack, timeout_s=120)
    finally:
        stack.stop()
        observer.finish()
    try:
        assert not left, f"the run ended before these happened: {left} (raise DAPO_CHAOS_STEPS)"
        check_outcome(store, stack, observer, chaos, status, stuck, spec.data.train_batch_size)
    finally:
        server.stop()
        if small_disk:
            subprocess.run(["umount", "-l", str(runs)], check=False)


def wait_for_exits(stack: Stack, timeout_s: float) -> list[str]:
    """Every service ends by itself once the run is over (one restarted just before the end
    may first wait out its start-up); the ones still running after ``timeout_s`` are stuck.
    Nothing is restarted any more: the run is over."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.popen.poll() is not None for p in stack.procs):
            return []
        time.sleep(0.5)
    return [p.worker_id for p in stack.procs if p.popen.poll() is None]


def lineage(rows: list[dict]) -> list[dict]:
    """The steps of the final policy's history: for each step, the row trained last (a
    crash rolls back to the newest checkpoint, whose later steps are trained again)."""
    by_step = {}
    for r in rows:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def check_outcome(store, stack, observer, chaos, status, stuck, batch_size) -> None:
    run_id = stack.run_id
    state = store.state(run_id)
    account = store.account(run_id)
    client = store.client
    stats = {k.decode(): int(v) for k, v in client.hgetall(run_key(run_id, "stats")).items()}
    rows = metrics_lines(stack.run_dir)
    history = lineage(rows)
    trained_ids = [r["batch_id"] for r in history]
    groups_of = {}
    for b in observer.batches:
        groups_of.setdefault(b.batch_id, []).append(list(b.group_ids))
    trained_groups = [g for bid in trained_ids for g in groups_of.get(bid, [[]])[-1]]
    in_flight = prompts_on_streams(client, run_id)
    resolved = (account["trained"] + account["filtered_all_correct"]
                + account["filtered_all_wrong"] + account["dropped_stale"] + account["dead"])  # fmt: skip
    lost = account["dispatched"] - resolved - in_flight
    duplicated = len(trained_groups) - len(set(trained_groups))
    final = Path(state.final_checkpoint or "")
    trainer_state = json.loads((final / "trainer_state.json").read_text()) if final.name else {}
    figures = dict(chaos.figures)
    figures.update(
        seed=SEED, steps=state.step, policy_version=state.policy_version,
        checkpoint_disk_of_its_own=chaos.small_disk,
        dispatched=account["dispatched"], trained=account["trained"],
        filtered=account["filtered_all_correct"] + account["filtered_all_wrong"],
        stale=account["dropped_stale"], dead=account["dead"], in_flight=in_flight,
        dead_letters={k: v for k, v in stats.items() if k.startswith("dead.")},
        retrained_after_crash=len(rows) - len(history),
        resumed_from_checkpoint=sum(p.log_path.read_text().count("resumed from ")
                                    for p in stack.procs if p.kind == "learner"),
        saves_retried_on_full_disk=sum(p.log_path.read_text().count("; removed ")
                                       for p in stack.procs if p.kind == "learner"),
        lost=lost, duplicated=duplicated, stuck=stuck,
    )  # fmt: skip
    print("\nchaos figures: " + json.dumps(figures, indent=1, default=str))
    logs = "\n".join(f"--- {p.worker_id}\n{p.log_path.read_text()[-2500:]}" for p in stack.procs)
    assert status == "completed", f"{status}: {state.error}\n{logs}"
    assert state.step == STEPS and trained_ids == list(range(STEPS)), trained_ids
    assert lost == 0, figures
    assert duplicated == 0 and len(trained_groups) == STEPS * batch_size, figures
    assert account["batches"] == STEPS and account["trained"] == STEPS * batch_size
    assert stuck == [], logs
    # the final policy is the one its checkpoint holds, and its version is the run's
    assert trainer_state.get("step") == STEPS and state.policy_version == STEPS, trainer_state
    assert chaos.figures["kills of learner-0"] >= 1 and figures["resumed_from_checkpoint"] >= 1
    if chaos.figures["disk filled"]:  # the learner pruned and saved again, and went on
        assert figures["saves_retried_on_full_disk"] >= 1, logs
    for stream, n in DEAD_LETTERED.items():  # every poison entry was set aside and counted
        assert stats.get(f"dead.{stream}", 0) >= n * chaos.injections, (stream, stats)
    poisoned = sum(DEAD_LETTERED[s] for s in ("prompts", "rollouts", "scored")) * chaos.injections
    assert (stats.get("dead.prompts", 0) + stats.get("dead.rollouts", 0)
            + stats.get("dead.scored", 0)) == poisoned + account["dead"], stats  # fmt: skip
