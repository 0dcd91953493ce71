"""Settings of the control API process, from ``DAPO_*`` environment variables.

The bearer token comes from ``DAPO_API_TOKEN`` or from a file named by
``DAPO_API_TOKEN_FILE`` (a mounted Kubernetes secret). Without either, the
API refuses to start unless ``DAPO_AUTH_DISABLED=true`` says so explicitly:
an open control plane must be a decision, never an accident.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from dapo.runtime.config import ConfigError, ServiceSettings

MIN_TOKEN_LENGTH = 16
"""Shortest bearer token accepted: a guessable token is an open control plane."""


class ApiSettings(ServiceSettings):
    """Where the control API listens, how it authenticates, and what it may start."""

    model_config = SettingsConfigDict(
        env_prefix="DAPO_", extra="ignore", frozen=True, populate_by_name=True
    )
    host: str = Field("127.0.0.1", min_length=1)
    """Address to bind (DAPO_HOST; 0.0.0.0 in a container)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on (DAPO_PORT; 0 = pick a free one)."""
    token: SecretStr | None = Field(None, validation_alias="DAPO_API_TOKEN")
    """Bearer token every protected request must carry (DAPO_API_TOKEN)."""
    token_file: Path | None = Field(None, validation_alias="DAPO_API_TOKEN_FILE")
    """File holding the bearer token, e.g. a mounted secret (DAPO_API_TOKEN_FILE)."""
    auth_disabled: bool = False
    """Serve without authentication; only honoured when no token is configured."""
    allow_concurrent_runs: bool = False
    """Accept a new run while another one is still active (DAPO_ALLOW_CONCURRENT_RUNS)."""
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    """Largest request body accepted (DAPO_MAX_BODY_BYTES); a run spec is a few KiB."""
    autostart_config: Path | None = None
    """Run spec YAML started at startup when no run is active (DAPO_AUTOSTART_CONFIG)."""

    @model_validator(mode="after")
    def _auth_is_explicit(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set only one of DAPO_API_TOKEN and DAPO_API_TOKEN_FILE")
        if self.token is not None:
            check_token_length(self.token.get_secret_value().strip(), "DAPO_API_TOKEN")
        if self.token_file is not None and not self.token_file.is_file():
            raise ValueError(f"DAPO_API_TOKEN_FILE {str(self.token_file)!r} is not a file")
        configured = self.token is not None or self.token_file is not None
        if configured and self.auth_disabled:
            raise ValueError("auth_disabled is true but a token is configured: choose one")
        if not configured and not self.auth_disabled:
            raise ValueError(
                "no API token: set DAPO_API_TOKEN or DAPO_API_TOKEN_FILE, "
                "or DAPO_AUTH_DISABLED=true to serve without authentication"
            )
        return self

    def resolved_token(self) -> str | None:
        """The token to expect, read from the file when one is given; None = auth disabled."""
        if self.token is not None:
            return self.token.get_secret_value().strip()
        if self.token_file is None:
            return None
        value = self.token_file.read_text().strip()
        try:
            return check_token_length(value, f"DAPO_API_TOKEN_FILE {str(self.token_file)!r}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def check_token_length(token: str, source: str) -> str:
    """``token`` when long enough; else a ValueError naming where it came from."""
    if not token:
        raise ValueError(f"{source} is empty")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{source} is {len(token)} characters: an API token needs at least "
            f"{MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 24`)"
        )
    return token
