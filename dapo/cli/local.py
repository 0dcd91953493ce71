"""One training run on this machine, start to finish (what ``make run`` does)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from dapo.cli.evaluate import EvalSpec, evaluate_model_dir
from dapo.cli.plots import plot_run, read_metrics
from dapo.cli.stack import SERVICE_ORDER, Stack, print_table
from dapo.data.dataset import DatasetError, load_default_or_files
from dapo.data.models import load_tokenizer, pick_device, resolve_model_dir
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ConfigError, load_run_spec
from dapo.runtime.runs import RunStore
from dapo.transport.redis_bus import connect
from dapo.transport.redis_embed import EmbeddedRedis
from proto.lifecycle import FINAL
from proto.messages import SamplingParams
from proto.runspec import RunSpec


class LocalSettings(BaseSettings):
    """Where ``dapo up`` finds Redis and the default task (DAPO_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="DAPO_", extra="ignore", frozen=True)
    redis_url: str = ""
    """Redis to run in (DAPO_REDIS_URL); empty: start an embedded one."""
    cache_dir: str = ""
    """Where the default task is built (DAPO_CACHE_DIR); empty: the repository's .cache/."""


@dataclass
class LocalRun:
    spec: RunSpec
    rollout_workers: int = 1
    skip_eval: bool = False
    eval_n: int | None = None
    settings: LocalSettings = field(default_factory=LocalSettings)

    @property
    def cache_dir(self) -> str | None:
        return self.settings.cache_dir or None

    def eval_spec(self) -> EvalSpec:
        vk = self.spec.rollout.val_kwargs
        sampling = SamplingParams(
            n=self.eval_n or vk.n,
            temperature=vk.temperature,
            top_p=vk.top_p,
            max_new_tokens=self.spec.data.max_response_length,
            seed=self.spec.data.seed,
        )
        return EvalSpec(sampling, mode=self.spec.reward.mode)

    def evaluate(self, model_dir: Path, desc: str) -> dict[str, float]:
        d = self.spec.data
        return evaluate_model_dir(
            model_dir,
            self.val_rows,
            self.eval_spec(),
            device=pick_device("auto"),
            template=d.prompt_template,
            apply_chat_template=d.apply_chat_template,
            desc=desc,
        )

    def prepare(self) -> Path:
        """Everything that can reject the run, before any process starts."""
        model_dir = resolve_model_dir(self.spec.model, self.cache_dir, progress=True)
        key = self.spec.data.prompt_key
        # every row is validated here, so a bad one stops the run before anything starts
        train = load_default_or_files(self.spec.data.train_files, self.cache_dir, prompt_key=key)
        PromptSource(
            train, load_tokenizer(self.spec.model, self.cache_dir), self.spec.data
        ).check_all()
        self.val_rows = load_default_or_files(
            self.spec.data.val_files, self.cache_dir, split="val", prompt_key=key
        )
        return model_dir

    def main(self) -> int:
        # Ctrl-C (and a supervisor's SIGTERM) become one graceful path, even where the
        # shell started us with SIGINT ignored: stop the run, then every process we started.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
        t_start = time.time()
        print(f"preparing (model, data) for run spec '{self.spec.name}' ...", flush=True)
        model_dir = self.prepare()
        url = self.settings.redis_url
        with contextlib.ExitStack() as stack:
            if not url:
                url = stack.enter_context(EmbeddedRedis()).url
                print(f"embedded Redis at {url}")
            client = connect(url)
            store = RunStore(client)
            run_id = store.create(self.spec).run_id
            run_dir = Path(self.spec.trainer.runs_dir) / run_id
            write_config(run_dir, self.spec)
            print(f"run {run_id} -> {run_dir}")
            before = {} if self.skip_eval else self.evaluate(model_dir, "eval before")
            k = self.eval_spec().sampling.n
            if before:
                print(f"held-out acc/mean@{k} before training: {before[f'acc/mean@{k}']:.3f}")
            services = Stack(url, run_id, run_dir, threads=self._threads())
            stack.callback(services.stop)
            try:
                self._start(services)
                store.act(run_id, "start")
                t_train = time.time()
                self._follow(store, services, run_id, run_dir)
                train_s = time.time() - t_train
            except KeyboardInterrupt:
                print("\nstopping: the learner writes a final checkpoint ...", flush=True)
                with contextlib.suppress(Exception):
                    store.act(run_id, "stop")
                    self._wait_final(store, run_id, 60)
                return 130
            services.stop()
            return self._finish(client, run_id, run_dir, before, train_s, t_start)

    def _threads(self) -> int:
        return max(1, (os.cpu_count() or 2) // 2)

    def _start(self, services: Stack) -> None:
        for kind in SERVICE_ORDER:
            for i in range(self.rollout_workers if kind == "rollout" else 1):
                services.start(kind, i)
        token = secrets.token_urlsafe(24)
        token_file = services.run_dir / "api_token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        api = services.start("api", extra_env={"DAPO_API_TOKEN": token})
        services.wait_ready()
        print_table(services.procs)
        print(f"control API: http://127.0.0.1:{api.port}  (bearer token in {token_file})")

    def _follow(self, store: RunStore, services: Stack, run_id: str, run_dir: Path) -> None:
        total = self.spec.trainer.total_training_steps
        bar = tqdm(total=total, desc="training", unit="step")
        seen = 0

        def restarted(proc) -> None:
            store.record_restart(run_id, proc.worker_id)

        while True:
            state = store.state(run_id)
            if state.status not in FINAL:  # a service that died mid-run comes back
                services.supervise(restarted)
            rows = read_metrics(run_dir)
            if len(rows) > seen:
                bar.update(len(rows) - seen)
                seen = len(rows)
                r = rows[-1]
                bar.set_postfix(
                    reward=f"{r['reward_mean']:.2f}",
                    acc=f"{r['acc_mean']:.2f}",
                    kept=f"{r['kept_ratio']:.2f}",
                    ent=f"{r.get('entropy', 0):.2f}",
                    lag=f"{r['version_lag']:.1f}",
                    v=int(r["version"]),
                )
            if state.status == "failed":
                bar.close()
                raise RuntimeError(f"run failed: {state.error}")
            if state.status in ("completed", "stopped"):
                bar.close()
                return
            time.sleep(0.5)

    def _wait_final(self, store: RunStore, run_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if store.state(run_id).status in FINAL:
                return
            time.sleep(0.5)

    def _finish(self, client, run_id, run_dir, before, train_s, t_start) -> int:
        final = RunStore(client).state(run_id).final_checkpoint
        final_dir = Path(final) if final else None
        k = self.eval_spec().sampling.n
        after = {}
        if not self.skip_eval and final_dir is not None:
            after = self.evaluate(final_dir, "eval after")
        rows = read_metrics(run_dir)
        samples = len(rows) * self.spec.data.train_batch_size * self.spec.rollout.n
        summary = {
            "run_id": run_id,
            "steps": len(rows),
            "wall_s": round(time.time() - t_start, 1),
            "train_wall_s": round(train_s, 1),
            "trained_samples_per_s": round(samples / train_s, 2) if train_s else None,
            "final_checkpoint": str(final_dir) if final_dir else None,
            "eval_k": k,
        }
        if before and after:
            summary.update(
                acc_before=before[f"acc/mean@{k}"],
                acc_after=after[f"acc/mean@{k}"],
                eval_before=before,
                eval_after=after,
            )
        write_summary(run_dir, summary)
        if rows:
            print(f"curves: {plot_run(run_dir)}")
        print(
            json.dumps({k2: v for k2, v in summary.items() if not k2.startswith("eval_")}, indent=2)
        )
        if before and after:
            print(
                f"held-out acc/mean@{k}: {summary['acc_before']:.3f} -> {summary['acc_after']:.3f}",
                file=sys.stderr,
            )
        return 0


def up(
    config: str | None,
    overrides: list[str],
    *,
    rollout_workers: int = 1,
    skip_eval: bool = False,
    eval_n: int | None = None,
) -> int:
    try:
        spec = load_run_spec(config, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return LocalRun(
            spec, rollout_workers=rollout_workers, skip_eval=skip_eval, eval_n=eval_n
        ).main()
    except (DatasetError, FileNotFoundError) as exc:  # bad input: say what and where, no trace
        print(f"error: {exc}", file=sys.stderr)
        return 2


def write_config(run_dir: Path, spec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    )


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
