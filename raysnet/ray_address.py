"""Which Ray a command uses: the cluster RAY_ADDRESS names (`ray job submit` sets it), or one of this
machine's own."""

from __future__ import annotations

import os

from raysnet.errors import UsageError


def local_ray() -> bool:
    """Whether a run starts a Ray of this machine's own: no cluster named (`ray job submit` and a
    cluster's user set RAY_ADDRESS), so no autoscaler will add what this machine lacks."""
    return not os.environ.get("RAY_ADDRESS")


def check_ray_address(timeout_s: float = 5.0) -> None:
    """Something listens at RAY_ADDRESS's host:port, checked before anything is written: Ray's own
    client retries a dead address for minutes, printing only its retry warnings. (Unset: a local
    Ray; "auto" and other forms are left to Ray.)"""
    import socket
    from urllib.parse import urlparse

    address = os.environ.get("RAY_ADDRESS", "")
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:  # a port that is not a number
        host = port = None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"RAY_ADDRESS={address} names a Ray cluster, but nothing answers at {host}:{port} "
                         f"({e.strerror or type(e).__name__}). Start the cluster there (ray start --head), fix "
                         "RAY_ADDRESS, or unset it to run on a Ray of this machine's own.") from None
