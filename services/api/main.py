"""Control API entry point (``dapo service api`` / the API container)."""

from __future__ import annotations

import sys

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings


def main() -> int:
    from dapo.runtime.config import ConfigError
    from dapo.runtime.service import setup_logging

    try:
        settings = ApiSettings.from_env()
        setup_logging("api", settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the process's logging format
        access_log=settings.log_level == "DEBUG",  # probes would flood INFO logs
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
