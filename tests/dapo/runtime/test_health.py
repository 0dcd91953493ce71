"""The per-process health server: its three endpoints, and idle connections let go."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from dapo.runtime.health import HealthServer


def test_endpoints_answer():
    registry = CollectorRegistry()
    Counter("dapo_test_events", "events", registry=registry).inc(3)
    server = HealthServer(registry, lambda: (False, "waiting for a run")).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        try:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
            raise AssertionError("readyz should be 503")
        except urllib.error.HTTPError as err:
            assert err.code == 503 and b"waiting for a run" in err.read()
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read()
        assert b"dapo_test_events_total 3.0" in body
    finally:
        server.stop()


def test_an_idle_connection_is_closed_and_frees_its_thread():
    server = HealthServer(CollectorRegistry(), lambda: (True, "ok"), idle_timeout_s=0.3).start()
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        time.sleep(0.1)
        assert threading.active_count() >= before + 5  # one thread each, while they wait
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""  # the server hung up
            s.close()
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
    finally:
        server.stop()
