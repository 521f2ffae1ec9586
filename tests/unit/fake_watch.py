"""A stand-in for the HTTP response the Kubernetes client's watch streams from, fed line by line from a queue: what
the server's ConfigMap-watch unit tests push events through (None ends the stream)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any


class FakeResponse:
    def __init__(self, lines: queue.Queue[bytes | None]) -> None:
        self.lines = lines

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        while True:
            line = self.lines.get()
            if line is None:
                return
            yield line

    def close(self) -> None: ...

    def release_conn(self) -> None: ...
