"""Ports and start-up waits for the servers the tests start on 127.0.0.1 (S3, MLflow, Ray)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float) -> None:
    """Poll a local server we started until it answers; fail saying so when the time is up."""
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:  # 401 too: a token-protected dashboard is up
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s (a server the test started; slow to "
                         "start on a loaded machine)")
