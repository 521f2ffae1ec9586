"""What the shared request schema refuses is refused on the vLLM gateway too, by name, before anything is relayed:
the gateway relays messages and `response_format` as sent only once they have passed these checks."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.settings import ServerSettings

from devcluster.testing.ports import free_port

MODEL = "deepseek-tiny"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(("change", "param"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "robot", "content": "hello"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"response_format": {"type": "regex"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": {}}}},
     "response_format.json_schema.name"),
])
async def test_the_shared_schemas_refusals_reach_no_engine(change: dict[str, Any], param: str) -> None:
    # nothing listens at the engine's URL: a request that got as far as relaying would be a 503, not this 400
    settings = ServerSettings(engine="vllm", engine_url=f"http://127.0.0.1:{free_port()}", model_name=MODEL,
                              auth="disabled", no_cache=True)
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions",
                                     json={"model": MODEL, "messages": HELLO, "max_tokens": 2, **change})
        valid = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert valid.status_code == 503  # the same request without the change goes on towards the engine
