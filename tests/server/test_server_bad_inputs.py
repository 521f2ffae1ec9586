"""Bad requests, table-driven: each gets the right status and an error body in OpenAI's exact shape."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from devcluster.testing.model_server import SigningKey, b64url, claims, mint, write_json_atomically
from devcluster.testing.polling import wait_for

MODEL = "deepseek-tiny"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
OK_CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_TEXT: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@dataclass
class Case:
    name: str
    status: int
    path: str = CHAT
    method: str = "POST"
    json: Any = None
    content: bytes | None = None
    token: str | Callable[[Callable[..., str], SigningKey], str | None] = "valid"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None  # what the error message must say (the reason, for a refused key)


def chat(**changes: Any) -> dict[str, Any]:
    body = {**OK_CHAT, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def text(**changes: Any) -> dict[str, Any]:
    body = {**OK_TEXT, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def unsigned_none(_: Callable[..., str], key: SigningKey) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64url(json.dumps(claims()).encode())
    return f"{header}.{payload}."


def hs256_with_public_key(_: Callable[..., str], key: SigningKey) -> str:
    # the classic algorithm-confusion attack: HMAC keyed with the (public) verification key
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64url(json.dumps(claims()).encode())
    signature = hmac.new(key.public_raw(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


LONG_PROMPT = "token " * 400
NOW = int(time.time())


def now() -> int:
    """The time when a case runs (cases are collected minutes before they run in a full session)."""
    return int(time.time())

CASES = [
    # request bodies
    Case("malformed json", 400, content=b'{"model": "deepseek-tiny", "messages": [', code="invalid_json"),
    Case("no body", 400, code="invalid_json", message="the request has no body"),
    Case("empty body sent as JSON", 400, content=b"", code="invalid_json", message="the request has no body"),
    Case("body not UTF-8", 400, content=b'{"model": "deepseek-tiny", "messages": [{"role": "user", '
         b'"content": "\xff"}]}', code="invalid_json", message="encoded as UTF-8"),
    Case("body nested deeper than the JSON parser goes", 400,
         content=b'{"model": "deepseek-tiny", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
         code="invalid_json"),
    Case("body is a list", 400, json=[OK_CHAT]),
    Case("body is a string", 400, json="hello"),
    Case("model missing", 400, json=chat(model=...), param="model", code="missing_required_parameter"),
    Case("model wrong type", 400, json=chat(model=42), param="model"),
    Case("unknown model", 404, json=chat(model="gpt-4o"), code="model_not_found", param="model"),
    Case("messages missing", 400, json=chat(messages=...), param="messages"),
    Case("messages empty", 400, json=chat(messages=[]), param="messages"),
    Case("messages not a list", 400, json=chat(messages="hi"), param="messages"),
    Case("message role unknown", 400, json=chat(messages=[{"role": "wizard", "content": "hi"}]),
         param="messages[0].role"),
    Case("user message without content", 400, json=chat(messages=[{"role": "user"}]), param="messages[0].content",
         code="missing_required_parameter"),
    Case("user message with null content", 400, json=chat(messages=[{"role": "user", "content": None}]),
         param="messages[0].content", code="missing_required_parameter"),
    Case("system message with null content", 400, json=chat(messages=[
        {"role": "system", "content": None}, {"role": "user", "content": "hi"}]), param="messages[0].content",
         code="missing_required_parameter"),
    Case("message content wrong type", 400, json=chat(messages=[{"role": "user", "content": 5}])),
    Case("temperature negative", 400, json=chat(temperature=-0.5), param="temperature"),
    Case("temperature huge", 400, json=chat(temperature=50), param="temperature"),
    Case("temperature a string", 400, json=chat(temperature="hot"), param="temperature"),
    Case("top_p zero", 400, json=chat(top_p=0), param="top_p"),
    Case("top_p above one", 400, json=chat(top_p=1.5), param="top_p"),
    Case("n zero", 400, json=chat(n=0), param="n"),
    Case("n huge", 400, json=chat(n=1000), param="n"),
    Case("max_tokens zero", 400, json=chat(max_tokens=0), param="max_tokens"),
    Case("completion max_tokens zero", 400, path=TEXT, json=text(max_tokens=0), param="max_tokens"),
    # zero is vLLM's echo-only request: an engine without echo refuses the echo
    Case("completion echo with max_tokens zero", 400, path=TEXT, json=text(max_tokens=0, echo=True), param="echo",
         code="unsupported_parameter"),
    Case("max_tokens negative", 400, json=chat(max_tokens=-5), param="max_tokens"),
    Case("max_tokens huge", 400, json=chat(max_tokens=10**9), param="max_tokens", code="invalid_value"),
    Case("prompt beyond context", 400, json=chat(messages=[{"role": "user", "content": LONG_PROMPT * 3}]),
         code="context_length_exceeded", param="messages"),
    Case("prompt plus max_tokens beyond context", 400, path=TEXT,
         json=text(prompt=" ".join(["hello"] * 120)[:1000], max_tokens=64), code="context_length_exceeded"),
    Case("too many stop sequences", 400, json=chat(stop=["a", "b", "c", "d", "e"]), param="stop",
         message="at most 4 items"),
    Case("empty stop sequence", 400, json=chat(stop=""), param="stop"),
    Case("stream wrong type", 400, json=chat(stream=[1]), param="stream"),
    Case("seed not an integer", 400, json=chat(seed="abc"), param="seed"),
    Case("seed out of range", 400, json=chat(seed=2**70), param="seed"),
    Case("tools unsupported", 400, json=chat(tools=[{"type": "function", "function": {"name": "f"}}]),
         param="tools", code="unsupported_parameter"),
    Case("unknown parameter", 400, json=chat(temprature=0.5), param="temprature", code="unsupported_parameter"),
    # OpenAI's default is true: false asks for at most one tool call, which an engine without tools cannot honour
    Case("parallel_tool_calls false unsupported", 400, json=chat(parallel_tool_calls=False),
         param="parallel_tool_calls", code="unsupported_parameter"),
    Case("user message with no content parts", 400, json=chat(messages=[{"role": "user", "content": []}]),
         param="messages[0].content"),
    Case("tool call id on a message unsupported", 400,
         json=chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "call_1"}]),
         param="messages[0].tool_call_id", code="unsupported_parameter"),
    Case("top_logprobs without logprobs", 400, json=chat(top_logprobs=2), param="top_logprobs"),
    Case("top_logprobs too many", 400, json=chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    Case("logit_bias token outside the vocabulary", 400, json=chat(logit_bias={"999999": 5}), param="logit_bias",
         code="invalid_value"),
    Case("logit_bias key not a token id", 400, json=chat(logit_bias={"hello": 5}), param="logit_bias"),
    # '²' is a digit to str.isdigit but no number to int()
    Case("logit_bias key a superscript digit", 400, json=chat(logit_bias={"\u00b2": 5}), param="logit_bias",
         code="invalid_value", message="must be token ids"),
    Case("logit_bias value out of range", 400, json=chat(logit_bias={"5": 101}), param="logit_bias[5]"),
    Case("response_format unknown type", 400, json=chat(response_format={"type": "yaml"}),
         param="response_format.type"),
    Case("response_format json_schema that cannot be enforced", 400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}),
         param="response_format", code="invalid_value"),
    # the grammar compiler's reason, without the time and C++ source file it logs it with
    Case("response_format json_schema of an unknown type", 400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
             "type": "object", "properties": {"a": {"type": "nonsense"}}}}}),
         param="response_format", code="invalid_value",
         message='the JSON schema cannot be enforced: Unsupported type "nonsense".'),
    # no schema: refused, as vLLM refuses it (rather than constraining the output to any JSON value, a bare number)
    Case("response_format json_schema without schema", 400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True}}),
         param="response_format.json_schema.schema", code="missing_required_parameter",
         message="send {} for any JSON value"),
    Case("response_format json_schema with a null schema", 400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": None}}),
         param="response_format.json_schema.schema", code="missing_required_parameter",
         message="send {} for any JSON value"),
    Case("completion response_format json_schema without schema", 400, path=TEXT,
         json=text(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
         param="response_format.json_schema.schema", code="missing_required_parameter",
         message="send {} for any JSON value"),
    Case("response_format json_schema without name", 400,
         json=chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
         param="response_format.json_schema.name", code="missing_required_parameter"),
    Case("completion echo unsupported", 400, path=TEXT, json=text(echo=True), param="echo"),
    Case("completion prompt missing", 400, path=TEXT, json=text(prompt=...), param="prompt"),
    Case("completion prompt of token ids outside the vocabulary", 400, path=TEXT, json=text(prompt=[1, 2, 10**6]),
         param="prompt", code="invalid_value", message="token ids outside the vocabulary (0..383): [1000000]"),
    Case("completion prompts of token ids, one outside the vocabulary", 400, path=TEXT,
         json=text(prompt=[[1, 2], [3, 384]]), param="prompt", message="outside the vocabulary"),
    Case("completion prompt of an empty list", 400, path=TEXT, json=text(prompt=[]), param="prompt",
         message="prompt must be a string, an array of strings, an array of token ids"),
    Case("completion prompt of an empty token list", 400, path=TEXT, json=text(prompt=[[1], []]), param="prompt",
         message="none of them empty"),
    Case("completion prompt of strings and numbers", 400, path=TEXT, json=text(prompt=["a", 1]), param="prompt",
         message="prompt must be"),
    Case("completion prompt of a negative token id", 400, path=TEXT, json=text(prompt=[1, -2]), param="prompt",
         message="non-negative integers"),
    Case("completion prompt of booleans", 400, path=TEXT, json=text(prompt=[True]), param="prompt",
         message="prompt must be"),
    Case("completion prompt of a number", 400, path=TEXT, json=text(prompt=5), param="prompt",
         message="prompt must be"),
    Case("completion prompts times n over the bound", 400, path=TEXT, json=text(prompt=["a"] * 9, n=8),
         param="prompt", code="invalid_value", message="asks for 72 choices (9 prompts, n=8)"),
    Case("image content part", 400, json=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
        param="messages[0].content[0].type", code="invalid_value",
        message="Content parts of type 'image_url' are not supported: the models this server serves read text only"),
    Case("audio content part after a text part", 400, json=chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]),
        param="messages[0].content[1].type", code="invalid_value", message="type 'input_audio' are not supported"),
    Case("text content part without text", 400, json=chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
         param="messages[0].content[0].text", code="missing_required_parameter"),
    # JSON's \u escapes can spell half of a UTF-16 pair, which is no character: raw bytes, as encoders refuse them
    Case("lone surrogate in a message", 400, content=b'{"model": "deepseek-tiny", "messages": [{"role": "user", '
         b'"content": "hi \\ud800"}]}', param="messages[0].content", code="invalid_value", message="surrogate"),
    Case("lone surrogate in a text part", 400, content=b'{"model": "deepseek-tiny", "messages": [{"role": "user", '
         b'"content": [{"type": "text", "text": "\\udc00"}]}]}', param="messages[0].content[0].text",
         code="invalid_value", message="surrogate"),
    Case("lone surrogate in a prompt", 400, path=TEXT,
         content=b'{"model": "deepseek-tiny", "prompt": "hi \\udfff", "max_tokens": 2}', param="prompt",
         code="invalid_value", message="surrogate"),
    Case("lone surrogate in a stop sequence", 400,
         content=b'{"model": "deepseek-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", '
         b'"\\ud800"]}', param="stop[1]", code="invalid_value", message="surrogate"),
    Case("lone surrogate in user", 400, path=TEXT,
         content=b'{"model": "deepseek-tiny", "prompt": "hi", "user": "\\ud800"}', param="user",
         code="invalid_value", message="surrogate"),
    Case("lone surrogate in the model", 400,
         content=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', param="model",
         code="invalid_value", message="surrogate"),
    Case("lone surrogate in a parameter name", 400,
         content=b'{"model": "deepseek-tiny", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
         code="invalid_value", message="surrogate"),
    Case("oversize body", 413, json=chat(messages=[{"role": "user", "content": "x" * 70_000}]),
         code="request_too_large"),
    Case("unknown route", 404, path="/v1/embeddings", json={}),
    Case("wrong method", 405, method="GET"),
    Case("history limit zero", 400, method="GET", path="/v1/history?limit=0", param="limit"),
    # API keys (docs/auth-contract.md)
    Case("no token", 401, token=lambda mk, k: None, code="missing_api_key",
         message="You didn't provide an API key"),
    Case("not bearer", 401, token=lambda mk, k: None, headers={"authorization": "Basic YWxpY2U6c2VjcmV0"},
         code="invalid_api_key", message="must be 'Bearer <key>'"),
    Case("garbage token", 401, token=lambda mk, k: "garbage.token.here", code="invalid_api_key",
         message="not a well-formed token"),
    Case("expired", 401, token=lambda mk, k: mk(exp=now() - 120, iat=now() - 7200, nbf=now() - 7200),
         code="invalid_api_key", message="The API key has expired"),
    Case("not yet valid", 401, token=lambda mk, k: mk(nbf=now() + 600), code="invalid_api_key",
         message="not valid yet"),
    Case("issued in the future", 401, token=lambda mk, k: mk(iat=now() + 600, nbf=now()), code="invalid_api_key",
         message="not valid yet"),
    Case("wrong audience", 401, token=lambda mk, k: mk(aud="team-a/other"), code="invalid_api_key",
         message="issued for another deployment (aud)"),
    Case("wrong issuer", 401, token=lambda mk, k: mk(iss="deepseek-operator/team-b/chat"), code="invalid_api_key",
         message="issued by an unknown issuer (iss)"),
    Case("missing uid claim", 401, token=lambda mk, k: mk(uid=None), code="invalid_api_key",
         message="lacks the required claim 'uid'"),
    Case("missing jti claim", 401, token=lambda mk, k: mk(jti=None), code="invalid_api_key",
         message="lacks the required claim 'jti'"),
    Case("scope not a list", 401, token=lambda mk, k: mk(scope="model:predict"), code="invalid_api_key",
         message="scope claim must be a list of strings"),
    Case("bad env", 401, token=lambda mk, k: mk(env="staging"), code="invalid_api_key",
         message="env claim must be one of dev, test, prod"),
    Case("alg none", 401, token=unsigned_none, code="invalid_api_key",
         message="signed with algorithm 'none'"),
    Case("HS256 signed with the public key", 401, token=hs256_with_public_key, code="invalid_api_key",
         message="signed with algorithm 'HS256'"),
    Case("unknown kid", 401, token=lambda mk, k: mint(SigningKey(kid="rogue")), code="invalid_api_key",
         message="signed by an unknown key (kid)"),
    Case("right kid, wrong key", 401, token=lambda mk, k: mint(SigningKey(kid=k.kid)), code="invalid_api_key",
         message="signature does not verify"),
    Case("revoked", 401, token=lambda mk, k: mk(jti="revoked-token-id-000000"), code="invalid_api_key",
         message="The API key has been revoked"),
    Case("missing scope", 403, token=lambda mk, k: mk(scope=["history:read"]), code="insufficient_scope"),
    Case("models with no token", 401, method="GET", path="/v1/models", token=lambda mk, k: None,
         message="You didn't provide an API key"),
]


@pytest.fixture(scope="module", autouse=True)
def revoke_fixed_token(auth_dir: Any, llama_server: Any, signing_key: SigningKey) -> None:
    revoked = json.loads((auth_dir / "revoked.json").read_text())
    revoked["revoked-token-id-000000"] = NOW + 3600
    write_json_atomically(auth_dir / "revoked.json", revoked)
    token = mint(signing_key, jti="revoked-token-id-000000")
    wait_for("the server to apply the revocation", lambda: httpx.get(
        f"{llama_server.url}/v1/models", headers={"authorization": f"Bearer {token}"}).status_code == 401, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, llama_server: Any, token_factory: Callable[..., str], signing_key: SigningKey) -> None:
    token = token_factory() if case.token == "valid" else case.token(token_factory, signing_key)  # type: ignore[operator]
    headers = dict(case.headers)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if case.content is not None:
        headers["content-type"] = "application/json"
    response = httpx.request(case.method, f"{llama_server.url}{case.path}", json=case.json, content=case.content,
                             headers=headers, timeout=30)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if case.code is not None:
        assert body["error"]["code"] == case.code
    if case.param is not None:
        assert body["error"]["param"] == case.param
    if case.message is not None:
        assert case.message in body["error"]["message"], body["error"]["message"]
    if token is not None:
        assert token not in response.text
