"""`deepseek-server` whose engine answers its first few requests and then fails every one: devcluster runs images
named `*deepseek-server-flaky*` as this, so a test can roll out a revision that passes the operator's pre-switch
verification (a handful of smoke requests) and then fails under live traffic.

The fault sits in the engine, not in front of the app: the failing requests take the server's own error path (a 500
in OpenAI's shape, or for a stream an error event after its 200; both counted as 500 in `deepseek_api_requests_total`
under their route, audited), which is what the operator's post-switch analysis reads from `/metrics`. The model's
warm-up is not counted. Never part of an image.
"""

from __future__ import annotations

import sys
from typing import Any

# The operator's pre-switch verification sends `rollout.analysis.requests` (the e2e tests use 2) smoke requests.
ANSWERED_BEFORE_FAILING = 5


class FailingAfter:
    """The loaded engine, answering `answered` requests and failing every later one with a RuntimeError."""

    def __init__(self, engine: Any, answered: int) -> None:
        self._engine = engine
        self._remaining = answered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: Any) -> Any:
        from deepseek_server.engine.base import GenerationStream

        if self._remaining > 0:
            self._remaining -= 1
            return self._engine.submit(request)
        stream = GenerationStream(request, lambda _stream: None)
        stream.queue.put_nowait(RuntimeError("injected fault: devcluster's flaky image fails every request after "
                                             f"its first {ANSWERED_BEFORE_FAILING}"))
        return stream


def main(argv: list[str]) -> int:
    import deepseek_server.app as server_app
    from deepseek_server.__main__ import main as server_main

    load_engine = server_app._load_engine

    async def load_then_fail_later(services: Any) -> None:
        await load_engine(services)
        if services.engine is not None:
            services.engine = FailingAfter(services.engine, ANSWERED_BEFORE_FAILING)

    server_app._load_engine = load_then_fail_later  # the app factory's lifespan looks it up when it starts
    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
