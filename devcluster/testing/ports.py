"""Loopback ports for servers started by tests and benchmarks.

A port learned from a closed socket can be taken by another process before the server binds it; where the server
runs in this process, bind first (`bound_socket`) and hand the socket over; where it is a child process, retry the
start when the bind lost that race (`ADDRESS_IN_USE` in its log).
"""

from __future__ import annotations

import socket

ADDRESS_IN_USE = "address already in use"


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel's choice, so rarely handed out twice in a row)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket bound to a free port of `host` (IPv4 loopback by default; `::1` for IPv6), held
    until the caller closes it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def lost_bind_race(log_text: str) -> bool:
    """Whether a server's log says it could not bind its port because another process holds it."""
    return ADDRESS_IN_USE in log_text.lower()
