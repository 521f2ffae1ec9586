"""A load that can be ramped: up to `workers` concurrent streaming chat completions through a URL, as many at once as
`set_concurrency` says, each on a new connection (so a Service spreads them over its pods), every failure counted.

Used by the autoscaling e2e tests and bench/autoscale.py.
"""

from __future__ import annotations

import json
import threading
import time

import httpx

from devcluster.testing.bluegreen import MODEL_NAME


class StreamLoad:
    def __init__(self, base_url: str, token: str, *, workers: int = 16, max_tokens: int = 48) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.max_tokens = max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._wanted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"stream-load-{i}")
                         for i in range(workers)]

    def set_concurrency(self, streams: int) -> None:
        """Keep `streams` requests in flight from now on (at most `workers`)."""
        with self._lock:
            self._wanted = streams

    def _stream_once(self, http: httpx.Client) -> None:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": self.max_tokens, "temperature": 0.9, "stream": True}
        finish = None
        with http.stream("POST", f"{self.base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {self.token}"}) as response:
            if response.status_code != 200:
                raise AssertionError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
            done = False
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
            if not done or finish not in ("stop", "length"):
                raise AssertionError(f"stream ended without [DONE] or a finish_reason (finish={finish})")

    def _run(self, index: int) -> None:
        # One client per worker, made once: building one (its SSL context above all) takes about 18 ms of CPU, and a
        # client per stream kept a loaded machine's workers from their next stream long enough for the load to dip.
        # No connection is kept alive, so each stream still opens its own.
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=120, trust_env=False) as http:
            while not self._stop.is_set():
                with self._lock:
                    active = index < self._wanted
                if not active:
                    self._stop.wait(0.1)
                    continue
                try:
                    self._stream_once(http)
                    with self._lock:
                        self.ok += 1
                except Exception as exc:  # every failure counts, whatever its type
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}"[:300])

    def answered(self) -> int:
        with self._lock:
            return self.ok

    def __enter__(self) -> StreamLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + 150
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
