"""The learner's weight-sync TCPStore listens on the address it is given, not on every
interface: torch's own listener would take connections on any address of the machine, and
the store has no authentication."""

from __future__ import annotations

import contextlib
import errno
import socket
from datetime import timedelta

import pytest
import redis
import torch.distributed as dist

from dapo.weights.sender import WeightSender, listen_socket
from tests.dapo.weights.harness import make_model


def outbound_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def is_local(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def other_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1 that a client could dial."""
    found = [a for a in (outbound_address(), "127.0.0.2") if a and is_local(a)]
    if not found:
        pytest.skip("this host has no address besides 127.0.0.1 to try the store on")
    return found


def connects(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((address, port))
        except OSError as exc:
            assert isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED, exc
            return False
    return True


def test_the_store_refuses_connections_on_other_local_addresses(redis_url, run_id):
    others = other_addresses()
    client = redis.Redis.from_url(redis_url)
    sender = WeightSender(client, run_id, list(make_model().named_parameters()), timeout_s=5)
    try:
        port = sender.port
        assert connects("127.0.0.1", port)
        for address in others:
            assert not connects(address, port), f"the store answers on {address}"
        # it is a working store: a worker's client reaches it on the published address
        peer = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=5))  # fmt: skip
        peer.set("probe", "1")
        assert sender._store.get("probe") == b"1"
    finally:
        sender.close()


def test_torch_alone_would_listen_everywhere():
    """Why the sender binds its own socket: the same call without it answers elsewhere."""
    others = other_addresses()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))  # fmt: skip
    assert any(connects(address, store.port) for address in others)


def test_listen_socket_binds_only_addresses_of_this_machine():
    sock = listen_socket("127.0.0.1", 0)
    assert sock is not None
    with contextlib.closing(sock):
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(OSError) as err:  # the port is taken: as the store would say
            listen_socket("127.0.0.1", port)
        assert err.value.errno == errno.EADDRINUSE
    assert listen_socket("203.0.113.7", 0) is None  # TEST-NET-3: not this machine
    assert listen_socket("no-such-host.invalid", 0) is None
