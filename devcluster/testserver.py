"""A tiny HTTP server for devcluster's tests (image ``*devcluster-testserver*``): stdlib only.

``python -m devcluster.testserver [--port 8080] [--name NAME] [--not-ready-file PATH] [--unhealthy-file PATH]
[--startup-seconds S]``; the port also comes from ``$PORT``, the name from ``$POD_NAME`` (else the hostname).

- ``GET /``           JSON: name, pid, pod IP (``$POD_IP``), hostname, boot id (new on every start), and
  ``slowInFlight``, the number of ``/slow`` requests being answered now
- ``GET /ready``      200, or 503 while ``--not-ready-file`` exists or after ``POST /control/ready?value=0``
- ``GET /healthz``    200, or 500 while ``--unhealthy-file`` exists or after ``POST /control/live?value=0``
- ``GET /env``        JSON of the environment
- ``GET /file?path=P`` the file's content (404 when missing)
- ``GET /slow?seconds=S`` answers after S seconds (an in-flight request)
- ``POST /crash?code=N`` exits at once with code N
SIGTERM stops accepting, lets in-flight requests finish, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class TestServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, port: int, name: str, not_ready_file: str | None, unhealthy_file: str | None) -> None:
        super().__init__(("0.0.0.0", port), Handler)
        self.name = name
        self.not_ready_file = not_ready_file
        self.unhealthy_file = unhealthy_file
        self.ready = True
        self.live = True
        self.boot_id = uuid.uuid4().hex
        self.slow_in_flight = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: TestServer
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive connections end, so SIGTERM's wait for in-flight requests stays short

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()

    def _send(self, code: int, body: object) -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        srv = self.server
        if url.path == "/":
            self._send(200, {"name": srv.name, "pid": os.getpid(), "podIP": os.environ.get("POD_IP"),
                             "hostname": socket.gethostname(), "boot": srv.boot_id,
                             "slowInFlight": srv.slow_in_flight})
        elif url.path == "/ready":
            ok = srv.ready and not (srv.not_ready_file and os.path.exists(srv.not_ready_file))
            self._send(200 if ok else 503, {"ready": ok})
        elif url.path == "/healthz":
            ok = srv.live and not (srv.unhealthy_file and os.path.exists(srv.unhealthy_file))
            self._send(200 if ok else 500, {"live": ok})
        elif url.path == "/env":
            self._send(200, dict(os.environ))
        elif url.path == "/file":
            path = Path(query.get("path", [""])[0])
            try:
                self._send(200, path.read_bytes())
            except OSError as exc:
                self._send(404, {"error": str(exc)})
        elif url.path == "/slow":
            with srv.lock:
                srv.slow_in_flight += 1
            try:
                time.sleep(float(query.get("seconds", ["1"])[0]))
            finally:
                with srv.lock:
                    srv.slow_in_flight -= 1
            self._send(200, {"name": srv.name, "slept": True})
        else:
            self._send(404, {"error": f"no route {url.path}"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        value = query.get("value", ["1"])[0] not in ("0", "false")
        if url.path == "/crash":
            sys.stdout.flush()
            os._exit(int(query.get("code", ["1"])[0]))
        elif url.path == "/control/ready":
            self.server.ready = value
            self._send(200, {"ready": value})
        elif url.path == "/control/live":
            self.server.live = value
            self._send(200, {"live": value})
        else:
            self._send(404, {"error": f"no route {url.path}"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devcluster.testserver")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--name", default=os.environ.get("POD_NAME") or socket.gethostname())
    parser.add_argument("--not-ready-file")
    parser.add_argument("--unhealthy-file")
    parser.add_argument("--startup-seconds", type=float, default=0.0, help="sleep before listening")
    args = parser.parse_args(argv)
    time.sleep(args.startup_seconds)
    server = TestServer(args.port, args.name, args.not_ready_file, args.unhealthy_file)

    def on_term(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    print(f"testserver {args.name} listening on 0.0.0.0:{args.port}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()  # waits for in-flight requests
    print("testserver stopped", flush=True)


if __name__ == "__main__":
    main()
