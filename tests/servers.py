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


def recording_env(path) -> dict[str, str]:
    """The environment that makes moto's S3 server record every request it receives, as one JSON
    line each in `path`, written before the request is handled (so a request whose answer has
    arrived is already there). Its console log is for people: its format changes with Werkzeug
    and Click (colour codes since Werkzeug 3.1.9), so tests never parse it."""
    return {"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(path)}


def recorded_requests(path) -> list[tuple[str, str]]:
    """(method, path without the query) of each request moto recorded in `path`, in order."""
    import json
    from pathlib import Path
    from urllib.parse import urlsplit

    if not Path(path).exists():
        return []
    entries = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(e["method"], urlsplit(e["url"]).path) for e in entries]
