"""The learner's TCPStore for the weight-sync groups.

Where the store listens. torch's TCPStore binds every interface whatever host it is
given, which exposes it on networks the learner never meant to serve (the store has no
authentication). So the learner binds its own socket to ``(host, port)`` when ``host`` is an
address of this machine and hands it to the store (``listen_socket``); only a host that is
not (a NAT or load-balancer address) falls back to torch's every-interface listener.
"""

from __future__ import annotations

import errno
import logging
import socket
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket | None:
    """A socket bound to ``(host, port)`` and listening, when ``host`` resolves to an address
    of this machine; None when it does not resolve or is not local (module doc). A port in
    use raises, as the store itself would."""
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    for family, kind, proto, _, address in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
    return None


def open_store(host: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """The learner's TCPStore, listening on ``host`` only when that is a local address."""
    sock = listen_socket(host, port)
    if sock is None:
        log.warning("weight-sync host %r is not an address of this machine: the store "
                    "listens on every interface", host)  # fmt: skip
        return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout)
    bound_port, fd = sock.getsockname()[1], sock.detach()  # the store owns (and closes) it
    return dist.TCPStore(
        host, bound_port, is_master=True, wait_for_workers=False, timeout=timeout,
        master_listen_fd=fd,
    )  # fmt: skip
