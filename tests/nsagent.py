"""
A helper process that lives in one network namespace and does small network
chores for a test: a TCP connect (the peer's handshake), an HTTP request with
a kept cookie jar (qBittorrent's Web API, the daemon's /status).

Starting a process in a namespace costs tens of milliseconds; this one starts
once and answers each request in about a millisecond, so a test can poll
often and time recoveries closely.  One JSON object a line on stdin, one
answer a line on stdout.

    ip netns exec NAME python -m tests.nsagent
"""

from __future__ import annotations

import http.cookiejar
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _connect(host: str, port: int, timeout: float) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return {"ok": True, "error": ""}
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _http(
    opener: urllib.request.OpenerDirector,
    url: str,
    form: dict[str, str] | None,
    timeout: float,
) -> dict[str, Any]:
    data = None if form is None else urllib.parse.urlencode(form).encode()
    try:
        with opener.open(url, data, timeout=timeout) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as e:
        with e:
            return {"status": e.code, "body": e.read().decode(errors="replace")}
    except OSError as e:
        return {"status": 0, "body": f"{type(e).__name__}: {e}"}


def serve() -> None:
    """Answer requests from stdin until it closes."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "connect":
            answer = _connect(request["host"], request["port"], request["timeout"])
        elif op == "http":
            answer = _http(
                opener, request["url"], request.get("form"), request["timeout"]
            )
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
