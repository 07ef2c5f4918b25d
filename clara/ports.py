"""Rendezvous ports, with the standard library only: the launchers check their settings before torch loads."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on the port. SO_REUSEADDR, as torchrun's store sets it: a closed run's connections
    lingering in TIME_WAIT do not keep the port from being used again."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
