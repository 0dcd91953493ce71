"""A small Python client of the control API.

    with DapoClient("http://127.0.0.1:8000", token=os.environ["DAPO_API_TOKEN"]) as api:
        run = api.start_run("cpu-small")
        final = api.wait(run["run_id"], timeout_s=3600)

Answers are the API's JSON objects as dicts. Any non-2xx answer raises
``ApiError`` carrying the status code and the server's detail; a server that
cannot be reached raises ``ApiError`` with status code 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from typing import Any

import httpx

from proto.runspec import RunSpec

FINAL_STATUSES = ("completed", "stopped", "failed")


class ApiError(RuntimeError):
    """The API refused or failed a request: ``status_code`` (0 = unreachable) and the
    server's ``detail`` (a string, or FastAPI's list of field errors with their ``loc``)."""

    def __init__(
        self, status_code: int, detail: Any, method: str, url: str, message: str | None = None
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(f"{method} {url} -> {status_code}: {message or detail}")


class DapoClient:
    """Calls the control API at ``base_url`` with an optional bearer token."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> DapoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json)
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach {self._http.base_url}: {exc}", method, path) from None
        if resp.is_success:
            return resp.json()
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(resp.status_code, resp.text, method, path)
        # a 422 also carries "message": its field errors as readable lines
        raise ApiError(
            resp.status_code, body.get("detail", body), method, path, body.get("message")
        )

    def start_run(self, spec: RunSpec | Mapping[str, Any] | str | os.PathLike) -> dict:
        """Start a run from a spec object, a plain mapping (validated by the server) or a
        YAML path (validated here first, ``configs/`` names accepted)."""
        if isinstance(spec, RunSpec):
            body: Any = spec.model_dump(mode="json")
        elif isinstance(spec, Mapping):
            body = dict(spec)
        else:
            from dapo.runtime.config import load_run_spec

            body = load_run_spec(spec).model_dump(mode="json")
        return self._call("POST", "/v1/runs", json=body)

    def list_runs(self) -> list[dict]:
        return self._call("GET", "/v1/runs")

    def status(self, run_id: str) -> dict:
        """State, step, policy version, latest metrics, sampler account, final checkpoint."""
        return self._call("GET", f"/v1/runs/{run_id}")

    def stop(self, run_id: str) -> dict:
        """Ask for a graceful stop: the learner drains, checkpoints, then marks it stopped."""
        return self._call("POST", f"/v1/runs/{run_id}/stop")

    def pause(self, run_id: str) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/pause")

    def resume(self, run_id: str) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/resume")

    def wait(
        self,
        run_id: str,
        until: Collection[str] = FINAL_STATUSES,
        timeout_s: float = 3600.0,
        poll_s: float = 1.0,
    ) -> dict:
        """Poll the status until it is one of ``until``; returns that status object."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.status(run_id)
            if current["status"] in until:
                return current
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run {run_id} still {current['status']} after {timeout_s:g}s "
                    f"(waiting for {', '.join(until)})"
                )
            time.sleep(min(poll_s, left))
