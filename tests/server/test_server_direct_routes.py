"""The completions' direct routes answer exactly as FastAPI's routes would: a well-formed request is served by the
direct route, anything else is handed to FastAPI's route, whose answer (errors included) is unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.routes.completions import DirectCompletionRoute
from starlette.types import Receive, Scope, Send

from devcluster.testing.model_server import ServerThread, tiny_settings

MODEL = "deepseek-tiny"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
OK_CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "temperature": 0}
OK_TEXT: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0}
JSON = {"content-type": "application/json"}

# (name, path, body bytes, headers, served by the direct route)
REQUESTS: list[tuple[str, str, bytes, dict[str, str], bool]] = [
    ("chat", CHAT, json.dumps(OK_CHAT).encode(), JSON, True),
    ("text", TEXT, json.dumps(OK_TEXT).encode(), JSON, True),
    ("chat streamed", CHAT, json.dumps({**OK_CHAT, "stream": True}).encode(), JSON, True),
    ("charset parameter", TEXT, json.dumps(OK_TEXT).encode(), {"content-type": "application/json; charset=utf-8"},
     True),
    ("unknown model", TEXT, json.dumps({**OK_TEXT, "model": "gpt-4o"}).encode(), JSON, True),
    ("unsupported parameter", CHAT, json.dumps({**OK_CHAT, "tools": [{"type": "function"}]}).encode(), JSON, True),
    ("malformed json", CHAT, b'{"model": "deepseek-tiny", "messages": [', JSON, False),
    ("empty body", CHAT, b"", JSON, False),
    ("body is a list", CHAT, json.dumps([OK_CHAT]).encode(), JSON, False),
    ("body is a string", TEXT, b'"hello"', JSON, False),
    ("model missing", CHAT, json.dumps({k: v for k, v in OK_CHAT.items() if k != "model"}).encode(), JSON, False),
    ("wrong type", TEXT, json.dumps({**OK_TEXT, "max_tokens": "many"}).encode(), JSON, False),
    ("model check", CHAT, json.dumps({**OK_CHAT, "top_logprobs": 2}).encode(), JSON, False),
    ("text/plain", TEXT, json.dumps(OK_TEXT).encode(), {"content-type": "text/plain"}, False),
    ("+json subtype", TEXT, json.dumps(OK_TEXT).encode(), {"content-type": "application/vnd.api+json"}, False),
    ("no content type", TEXT, json.dumps(OK_TEXT).encode(), {}, False),
    ("form", TEXT, b"model=deepseek-tiny&prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, False),
]


class Handovers:
    """Counts the requests each direct route handed to FastAPI's route."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, fallback: Callable[[Scope, Receive, Send], Any]) -> Callable[[Scope, Receive, Send], Any]:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            self.count += 1
            await fallback(scope, receive, send)

        return counted


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path], auth_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ServerThread, ServerThread, Handovers]]:
    """The same server twice: as built (direct routes first), and with the direct routes taken out."""
    work = tmp_path_factory.mktemp("direct-routes")
    handovers = Handovers()
    direct = create_app(tiny_settings(tiny_models["llama"], auth_dir=auth_dir, audit_log=work / "direct.jsonl"))
    routes = [route for route in direct.router.routes if isinstance(route, DirectCompletionRoute)]
    assert [route.path for route in routes] == [CHAT, TEXT]
    for route in routes:
        route.fallback = handovers.wrap(route.fallback)
    plain = create_app(tiny_settings(tiny_models["llama"], auth_dir=auth_dir, audit_log=work / "plain.jsonl"))
    plain.router.routes[:] = [r for r in plain.router.routes if not isinstance(r, DirectCompletionRoute)]
    with_direct, without = ServerThread(direct).start(), ServerThread(plain).start()
    yield with_direct, without, handovers
    with_direct.stop()
    without.stop()


def _comparable(response: httpx.Response) -> tuple[int, Any]:
    """Status and body, without what differs between two answers to one request (ids, creation times)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.split("\n\n")
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return response.status_code, [event.get("choices") for event in events]
    body = response.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created")}
    return response.status_code, body


@pytest.mark.parametrize(("name", "path", "content", "headers", "served_directly"), REQUESTS,
                         ids=[r[0] for r in REQUESTS])
def test_answers_are_fastapis(name: str, path: str, content: bytes, headers: dict[str, str], served_directly: bool,
                              servers: tuple[ServerThread, ServerThread, Handovers],
                              token_factory: Callable[..., str]) -> None:
    with_direct, without, handovers = servers
    auth = {"authorization": f"Bearer {token_factory()}", **headers}
    before = handovers.count
    direct = httpx.post(f"{with_direct.url}{path}", content=content, headers=auth, timeout=60)
    handed_over = handovers.count - before
    plain = httpx.post(f"{without.url}{path}", content=content, headers=auth, timeout=60)
    assert _comparable(direct) == _comparable(plain)
    assert handed_over == (0 if served_directly else 1)


@pytest.mark.parametrize("token", [None, "not-a-jwt"])
def test_a_refused_key_and_a_bad_body_in_fastapis_order(token: str | None,
                                                        servers: tuple[ServerThread, ServerThread, Handovers]) -> None:
    """FastAPI reads the body as JSON, then authenticates, then validates the body's fields: a key that is refused
    is a 401 for a well-formed body and for one with wrong fields, and JSON that does not parse is a 400 first."""
    with_direct, without, _ = servers
    headers = {**JSON, **({"authorization": f"Bearer {token}"} if token else {})}
    missing_messages = json.dumps({"model": MODEL}).encode()
    for content, status in ((json.dumps(OK_CHAT).encode(), 401), (missing_messages, 401), (b'{"model": ', 400)):
        direct = httpx.post(f"{with_direct.url}{CHAT}", content=content, headers=headers, timeout=30)
        plain = httpx.post(f"{without.url}{CHAT}", content=content, headers=headers, timeout=30)
        assert direct.status_code == status
        assert _comparable(direct) == _comparable(plain)


def test_other_methods_and_the_api_schema_are_fastapis(servers: tuple[ServerThread, ServerThread, Handovers]
                                                       ) -> None:
    with_direct, without, _ = servers
    for method in ("GET", "PUT"):
        direct = httpx.request(method, f"{with_direct.url}{CHAT}", timeout=30)
        plain = httpx.request(method, f"{without.url}{CHAT}", timeout=30)
        assert direct.status_code == plain.status_code == 405
        assert direct.headers.get("allow") == plain.headers.get("allow")
    schema = httpx.get(f"{with_direct.url}/openapi.json", timeout=30).json()
    assert schema == httpx.get(f"{without.url}/openapi.json", timeout=30).json()
    assert "post" in schema["paths"][CHAT] and "post" in schema["paths"][TEXT]
