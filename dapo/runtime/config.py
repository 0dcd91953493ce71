"""Loading and validating configuration, before anything starts.

Two kinds of settings:

- the **run spec** (``proto.runspec.RunSpec``): the algorithm, loaded from a
  YAML file in ``configs/``, then environment overrides
  (``DAPO_SPEC__ACTOR__CLIP_RATIO_HIGH=0.3``), then command-line overrides
  (``actor.clip_ratio_high=0.3``, as in verl/Hydra). A file may start from
  another with ``extends: <path>`` and state only what it changes, so a
  variant of a recipe reads as its difference (see ``load_config_tree``);
- **service settings** (``ServiceSettings`` subclasses): where a process
  connects and listens, from ``DAPO_*`` environment variables.

An invalid value raises ``ConfigError`` whose message names every bad field
by its dotted path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proto.runspec import RunSpec

ENV_SPEC_PREFIX = "DAPO_SPEC__"
EXTENDS_KEY = "extends"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration that must not start a run; the message names the fields."""


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = (
            f" (got {err['input']!r})"
            if "input" in err and not isinstance(err["input"], dict)
            else ""
        )
        lines.append(f"  {path}: {err['msg']}{got}")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict:
    """``["actor.optim.lr=1e-5", "rollout.n=8"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set_dotted(tree, name.strip(), yaml.safe_load(raw))
    return tree


def env_overrides(environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    for name, raw in environ.items():
        if name.startswith(ENV_SPEC_PREFIX):
            dotted = name[len(ENV_SPEC_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, yaml.safe_load(raw))
    return tree


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
        )
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the repository's ``configs/``."""
    p = Path(path)
    for candidate in (p, REPO_ROOT / "configs" / p, REPO_ROOT / "configs" / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (also looked in configs/)")


def _read_mapping(file: Path) -> dict:
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _base_path(ref: object, file: Path) -> Path:
    """Where ``extends: ref`` of ``file`` points: next to ``file`` first, then as ``--config``.

    Looking next to the extending file first keeps a family of configs movable
    as one folder; the fallback lets any file build on a shipped recipe by name.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{file}: {EXTENDS_KEY} must be a non-empty path string, got {ref!r}")
    for candidate in (file.parent / ref, file.parent / f"{ref}.yaml"):
        if candidate.is_file():
            return candidate
    try:
        return resolve_config_path(ref)
    except ConfigError:
        raise ConfigError(
            f"{file}: {EXTENDS_KEY} {ref!r}: base file not found "
            f"(looked next to {file.name} and in configs/)"
        ) from None


def load_config_tree(path: str | os.PathLike) -> dict:
    """The raw tree of a config file, with its ``extends`` chain merged in.

    The base is loaded first (it may extend another in turn), then this file's
    keys are deep-merged over it; the ``extends`` key itself is consumed here,
    so it never reaches ``RunSpec`` validation. A file that extends itself,
    directly or through others, is a ``ConfigError`` naming the whole chain.
    """
    return _load_tree(resolve_config_path(path), ())


def _load_tree(file: Path, chain: tuple[Path, ...]) -> dict:
    key = file.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(key) :], key))
        raise ConfigError(f"{EXTENDS_KEY} cycle: {cycle}")
    tree = _read_mapping(file)
    if EXTENDS_KEY not in tree:
        return tree
    base_file = _base_path(tree.pop(EXTENDS_KEY), file)
    return deep_merge(_load_tree(base_file, (*chain, key)), tree)


def load_run_spec(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunSpec:
    """YAML file (and what it extends) or defaults + environment + command-line overrides.

    Returns the validated RunSpec.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(resolve_config_path(path))
        tree = load_config_tree(path)
    tree = deep_merge(tree, env_overrides(os.environ if environ is None else environ))
    tree = deep_merge(tree, parse_overrides(overrides))
    return validate_run_spec(tree, source)


def validate_run_spec(tree: Mapping, source: str = "run spec") -> RunSpec:
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


class ServiceSettings(BaseSettings):
    """Where a service process connects and listens (from DAPO_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="DAPO_", extra="ignore", frozen=True)
    redis_url: str = Field("redis://127.0.0.1:6379/0", min_length=1)
    """Redis the run lives in (DAPO_REDIS_URL; rediss:// = TLS); never with a password in it."""
    redis_username: str = Field("", max_length=128, pattern=r"^[^\s]*$")
    """ACL user to log in to Redis as; empty = the default user (DAPO_REDIS_USERNAME)."""
    redis_password: SecretStr | None = None
    """Redis password, e.g. from a Kubernetes Secret (DAPO_REDIS_PASSWORD); None = no AUTH."""
    redis_tls_ca: Path | None = None
    """CA bundle that verifies a rediss:// server's certificate (DAPO_REDIS_TLS_CA)."""
    run_id: str = Field("", max_length=128)
    """Run to serve; empty = follow the newest active run (DAPO_RUN_ID)."""
    worker_id: str = Field("", max_length=128)
    """Name of this process in consumer groups; empty = hostname-pid."""
    health_port: int = Field(0, ge=0, le=65535)
    """Port of the /healthz, /readyz and /metrics endpoints (0 = pick a free one)."""
    health_host: str = "127.0.0.1"
    """Address the health endpoints bind to (0.0.0.0 in a container)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging verbosity."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Torch device for services that run a model."""
    threads: int = Field(0, ge=0)
    """Torch/worker threads (0 = library default)."""
    cache_dir: str = ""
    """Where the embedded default task is built and cached ("" = the repository's .cache/)."""
    redis_outage_max_s: float = Field(300.0, gt=0, le=86400)
    """Longest Redis outage a service waits out (/readyz 503) before it exits non-zero so
    that it is restarted (DAPO_REDIS_OUTAGE_MAX_S)."""
    redis_retry_max_s: float = Field(5.0, gt=0, le=60)
    """Cap on the back-off between tries to reach Redis during an outage; it starts at
    0.1 s and doubles (DAPO_REDIS_RETRY_MAX_S)."""
    startup_failure_limit: int = Field(3, ge=1, le=100)
    """Start-ups of one kind of service in a row that may fail before the run is marked
    failed; errors no restart can fix fail it at once (DAPO_STARTUP_FAILURE_LIMIT)."""

    @model_validator(mode="after")
    def _redis_login_is_consistent(self) -> ServiceSettings:
        """A login that cannot work, or that would leak or weaken, fails before any connect."""
        url = urlsplit(self.redis_url)
        password = self.redis_password
        if password is not None and not password.get_secret_value():
            raise ValueError("DAPO_REDIS_PASSWORD is empty")
        if self.redis_username and password is None:
            raise ValueError("DAPO_REDIS_USERNAME needs DAPO_REDIS_PASSWORD")
        if password is not None and (url.password or url.username):
            raise ValueError("log in with DAPO_REDIS_PASSWORD or in DAPO_REDIS_URL, not both")
        if any(key.startswith("ssl_") for key in parse_qs(url.query)):
            raise ValueError("TLS options of DAPO_REDIS_URL are refused: use DAPO_REDIS_TLS_CA")
        if self.redis_tls_ca is not None:
            if url.scheme != "rediss":
                raise ValueError("DAPO_REDIS_TLS_CA needs a rediss:// DAPO_REDIS_URL")
            if not self.redis_tls_ca.is_file():
                raise ValueError(f"DAPO_REDIS_TLS_CA {str(self.redis_tls_ca)!r} is not a file")
        return self

    @classmethod
    def from_env(cls, **overrides):
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, f"{cls.__name__} (DAPO_* env)")
            ) from None
