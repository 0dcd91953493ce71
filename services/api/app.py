"""The control API: an app factory whose handlers only translate HTTP to ``RunStore`` calls.

Routes (all under bearer-token auth except the probes and /metrics):

- ``POST /v1/runs``: validate a ``RunSpec``, create the run and set it
  ``running``; 409 while another run is active unless concurrent runs are allowed.
- ``GET /v1/runs``, ``GET /v1/runs/{run_id}``: states; the detail adds the
  learner's latest step figures and the sampler's account, all read from the
  run store in Redis (the API mounts no volume and reads no service's files).
- ``POST /v1/runs/{run_id}/stop|pause|resume``: the moves of
  ``proto.lifecycle.ACTIONS``, compare-and-set;
  asking for the state the run is already in is a no-op (200), any other
  illegal move is a 409 that says why.
- ``GET /openapi.json``: the schema, behind the token too (no /docs page).
- ``GET /healthz`` (alive), ``GET /readyz`` (Redis reachable and at least one
  service heartbeat), ``GET /metrics`` (Prometheus text, left open like
  every service's metrics endpoint so a scraper needs no secret).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from redis.exceptions import LockError

from dapo.runtime.config import load_run_spec
from dapo.runtime.runs import InvalidTransition, RunNotFound, RunStore, live_services
from dapo.runtime.service import redis_client
from proto.lifecycle import ACTIONS
from proto.runspec import RunSpec
from proto.state import RunState
from proto.vocab import RUN_ID_PATTERN
from services.api.guard import GuardMiddleware, SafeJSONResponse
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)

START_LOCK = "dapo:api:start-lock"
"""Redis lock serialising 'is a run active? then create one' across API replicas."""
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="Run identifier")]

USER_ACTIONS = ("stop", "pause", "resume")
"""Routes ``POST /v1/runs/{id}/<action>``; the moves are ``proto.lifecycle.ACTIONS``."""


class RunConflict(Exception):
    """Another run is active and concurrent runs are not allowed."""


class RunDetail(RunState):
    """A run's state plus what the services report about it."""

    latest_metrics: dict[str, Any] | None = None
    """The learner's figures of its latest step (``proto.state.StepReport``; non-finite
    values are null)."""
    account: dict[str, int] = {}
    """The sampler's prompt account (dispatched, trained, filtered, stale, in flight)."""


class ApiMetrics:
    """Request counts and latency per route template, and the number of active runs."""

    def __init__(self, registry: CollectorRegistry, store: RunStore) -> None:
        self.requests = Counter(
            "dapo_api_requests",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "dapo_api_request_seconds",
            "Time to answer a request",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        active = Gauge(
            "dapo_api_active_runs", "Runs pending, running, paused or stopping", registry=registry
        )
        active.set_function(lambda: _count_active(store))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class MetricsMiddleware:
    """ASGI middleware; the route label is the matched template, so ids do not
    multiply the series."""

    def __init__(self, app, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)


def _count_active(store: RunStore) -> float:
    try:
        return float(len(store.active()))
    except redis.RedisError:
        return math.nan


def start_run(store: RunStore, spec: RunSpec, allow_concurrent: bool) -> RunState:
    """Create a run and set it running; refuses while another run is active."""
    with store.client.lock(START_LOCK, timeout=10, blocking_timeout=10):
        if not allow_concurrent:
            active = store.active()
            if active:
                busy = active[-1]
                raise RunConflict(
                    f"run {busy.run_id} is {busy.status}; stop it first "
                    "(or enable allow_concurrent_runs)"
                )
        created = store.create(spec)
        return store.act(created.run_id, "start")


def run_detail(store: RunStore, run_id: str) -> RunDetail:
    """Everything the services report about a run, read from the run store alone."""
    state = store.state(run_id)
    report = store.latest_report(run_id)
    return RunDetail(
        **state.model_dump(),
        latest_metrics=report.figures if report else None,
        account=store.account(run_id),
    )


# -- dependencies ------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="The DAPO_API_TOKEN value.")


def get_store(request: Request) -> RunStore:
    return request.app.state.store


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected: str | None = request.app.state.token
    if expected is None:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


Store = Annotated[RunStore, Depends(get_store)]
Authed = [Depends(require_token)]


# -- routes ------------------------------------------------------------------------
def add_run_routes(app: FastAPI) -> None:
    @app.post("/v1/runs", status_code=201, response_model=RunState, dependencies=Authed)
    def create_run(spec: RunSpec, store: Store, request: Request) -> RunState:
        settings: ApiSettings = request.app.state.settings
        return start_run(store, spec, settings.allow_concurrent_runs)

    @app.get("/v1/runs", response_model=list[RunState], dependencies=Authed)
    def list_runs(store: Store) -> list[RunState]:
        return store.list()

    @app.get("/v1/runs/{run_id}", response_model=RunDetail, dependencies=Authed)
    def get_run(run_id: RunId, store: Store) -> RunDetail:
        return run_detail(store, run_id)

    for action in USER_ACTIONS:
        add_transition_route(app, action)

    # The schema sits behind the token like every control route (no open /docs page).
    @app.get("/openapi.json", include_in_schema=False, dependencies=Authed)
    def openapi_schema(request: Request) -> JSONResponse:
        return SafeJSONResponse(request.app.openapi())


def add_transition_route(app: FastAPI, action: str) -> None:
    target = ACTIONS[action][1]

    def handler(run_id: RunId, store: Store) -> RunState:
        state = store.act(run_id, action)
        if state.status == "stopping" and not learner_alive(store, run_id):
            # only a learner finishes a stop (with a final checkpoint); with none alive
            # (never started, or gone) the run would stay "stopping" forever
            state = store.finish(run_id, "stopped", error="stopped with no learner running")
        return state

    handler.__name__ = f"{action}_run"
    app.post(
        f"/v1/runs/{{run_id}}/{action}",
        response_model=RunState,
        dependencies=Authed,
        summary=f"{action.capitalize()} a run (sets status {target!r})",
    )(handler)


def learner_alive(store: RunStore, run_id: str) -> bool:
    """Whether a learner of ``run_id`` has a live heartbeat in the service registry."""
    return any(
        s["kind"] == "learner" and s.get("run_id") == run_id for s in live_services(store.client)
    )


def add_probe_routes(app: FastAPI) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "Redis down or no service registered"}})
    def readyz(store: Store) -> JSONResponse:
        try:
            store.client.ping()
            services = live_services(store.client)
        except redis.RedisError as exc:
            return SafeJSONResponse({"status": "not ready", "reason": f"redis: {exc}"}, 503)
        if not services:
            return SafeJSONResponse({"status": "not ready", "reason": "no service registered"}, 503)
        kinds = sorted({s["kind"] for s in services})
        return SafeJSONResponse({"status": "ready", "services": kinds})

    @app.get("/metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


# -- errors ------------------------------------------------------------------------
def _readable(errors: list[dict[str, Any]]) -> str:
    lines = ["invalid request:"]
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        path = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "(body)"
        lines.append(f"  {path}: {err.get('msg', 'invalid')}")
    return "\n".join(lines)


def _error_reply(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def reply(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RunNotFound):
            detail = f"run {exc.args[0]} not found"
        elif status == 503:
            detail = f"run store unavailable: {exc}"
        else:
            detail = str(exc)
        return SafeJSONResponse({"detail": detail}, status_code=status)

    return reply


ERROR_STATUS: dict[type[Exception], int] = {
    RunNotFound: 404,
    InvalidTransition: 409,
    RunConflict: 409,
    redis.ConnectionError: 503,
    redis.TimeoutError: 503,
    LockError: 503,
}


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        body = {"detail": jsonable_encoder(errors, custom_encoder={Exception: str})}
        body["message"] = _readable(errors)  # the same errors as "field.path: message" lines
        return SafeJSONResponse(body, status_code=422)

    for kind, status in ERROR_STATUS.items():
        app.add_exception_handler(kind, _error_reply(status))


# -- factory -----------------------------------------------------------------------
def create_app(settings: ApiSettings, client: redis.Redis | None = None) -> FastAPI:
    """The API over ``client`` (default: a connection to ``settings.redis_url``, logged in
    as the settings say)."""
    store = RunStore(client if client is not None else redis_client(settings))
    autostart = load_run_spec(settings.autostart_config) if settings.autostart_config else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if autostart is not None:
            autostart_run(store, autostart)
        yield

    app = FastAPI(
        title="DAPO control API",
        version="1",
        description="Start, stop, pause and inspect DAPO training runs.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.token = settings.resolved_token()
    app.state.registry = CollectorRegistry()
    app.add_middleware(GuardMiddleware, token=app.state.token, max_body=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=ApiMetrics(app.state.registry, store))
    add_run_routes(app)
    add_probe_routes(app)
    add_error_handlers(app)
    if app.state.token is None:
        log.warning("authentication disabled (auth_disabled=true): anyone can control runs")
    return app


def autostart_run(store: RunStore, spec: RunSpec) -> None:
    """Start ``spec`` unless a run is already active (a restarted API must not start twice)."""
    active = store.active()
    if active:
        log.info("autostart skipped: run %s is %s", active[-1].run_id, active[-1].status)
        return
    try:
        state = start_run(store, spec, allow_concurrent=False)
    except RunConflict as exc:  # another replica won the race
        log.info("autostart skipped: %s", exc)
        return
    log.info("autostarted run %s", state.run_id)
