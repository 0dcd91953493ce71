"""The local stack's supervisor: a dead service is restarted with back-off, bounded."""

from __future__ import annotations

import time

import pytest

from dapo.cli.stack import RestartPolicy, Stack


def test_restart_back_off_doubles_up_to_its_cap():
    policy = RestartPolicy(max_restarts=9, backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.delay(k) for k in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_crash_looping_service_is_restarted_then_given_up(tmp_path):
    # `dapo service bogus` is a real process that exits 2 at once (an unknown service)
    stack = Stack("redis://127.0.0.1:1/0", "r1", tmp_path, restart=RestartPolicy(2, 0.05, 0.1))
    proc = stack.start("bogus")
    restarted = []
    deadline = time.monotonic() + 60
    with pytest.raises(RuntimeError, match=r"bogus-0 died \(exit 2\) after 2 restarts") as err:
        while time.monotonic() < deadline:
            stack.supervise(lambda p: restarted.append((p.worker_id, p.restarts)))
            time.sleep(0.02)
    assert restarted == [("bogus-0", 1), ("bogus-0", 2)]
    assert "invalid choice: 'bogus'" in str(err.value)  # the log's tail says why
    log = proc.log_path.read_text()
    assert log.count("restarted by the supervisor") == 2  # one log, appended to
