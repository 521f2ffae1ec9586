"""Seeded random OpenAI requests (valid parameters in random combinations, `null` included) and a check of OpenAI's
contract on each answer: a 200 with every choice, `[DONE]` and no error event in a stream (unless the engine refuses
parameters in the stream, as vLLM does), JSON where JSON mode finished, or a 400 in OpenAI's error shape; never a
5xx. Used by the server tests on each engine."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def maybe(rng: random.Random, body: dict[str, Any], name: str, choices: list[Any]) -> None:
    if rng.random() < 0.35:
        body[name] = rng.choice(choices)


def random_request(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    """A path and a body: parameters each sent a third of the time, with valid values (and `null`)."""
    body: dict[str, Any] = {"model": model}
    maybe(rng, body, "temperature", [0, 0.7, 2, None])
    maybe(rng, body, "top_p", [1, 0.5, 1e-6, None])
    maybe(rng, body, "n", [1, 3, None])
    maybe(rng, body, "stream", [True, False, None])
    maybe(rng, body, "stop", ["a", ["\n", "x"], None])
    maybe(rng, body, "seed", [0, 7, None])
    maybe(rng, body, "presence_penalty", [-2, 1.5, None])
    maybe(rng, body, "frequency_penalty", [-1, 2, None])
    maybe(rng, body, "logit_bias", [{"5": -100, "7": 50}, {}, None, {"999999": 5}])
    maybe(rng, body, "response_format", [{"type": "json_object"}, {"type": "text"}, None,
                                          {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}])
    maybe(rng, body, "max_tokens", [1, 16, 48, None])
    if body.get("stream"):
        maybe(rng, body, "stream_options", [{"include_usage": True}, None])
    if rng.random() < 0.5:
        maybe(rng, body, "logprobs", [True, False, None])
        if body.get("logprobs"):
            maybe(rng, body, "top_logprobs", [0, 5])
        messages: list[dict[str, Any]] = [{"role": "user", "content": rng.choice(
            ["hi", "x" * 300, "héllo 😀", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]])}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": rng.choice(["system", "developer"]), "content": "be terse", "name": "n"})
        if rng.random() < 0.3:
            messages += [{"role": "assistant", "content": rng.choice([None, "ok"])}, {"role": "user", "content": "go"}]
        body["messages"] = messages
        return "/v1/chat/completions", body
    maybe(rng, body, "logprobs", [0, 3, None])
    body["prompt"] = rng.choice(["hello", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]], "x" * 2000])
    return "/v1/completions", body


def check(path: str, body: dict[str, Any], response: httpx.Response, refusal: str | None = "invalid_request_error",
          refused_in_stream: bool = False) -> None:
    """OpenAI's contract for one answer (raises AssertionError naming the request); `refusal`: the error `type` a 400
    must have (None: any). `refused_in_stream`: a stream may instead carry one error event (with a message) before
    its `[DONE]`, as vLLM refuses some parameters (a logit_bias id past the vocabulary) once it has started one."""
    where = f"{path} {json.dumps(body)[:400]} -> {response.status_code} {response.text[:400]}"
    assert response.status_code in (200, 400), where
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["message"] and isinstance(error["type"], str), where
        assert refusal is None or error["type"] == refusal, where
        return
    chat = path.endswith("chat/completions")
    prompts = 1 if chat or isinstance(body["prompt"], str) or isinstance(body["prompt"][0], int) else \
        len(body["prompt"])
    choices: dict[int, list[str]] = {}
    finishes: dict[int, str | None] = {}
    if body.get("stream"):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", where
        for line in lines[:-1]:
            event = json.loads(line[6:])
            if "error" in event:
                assert refused_in_stream and event["error"]["message"] and len(lines) == 2, where
                assert refusal is None or event["error"]["type"] == refusal, where
                return
            for choice in event["choices"]:
                text = choice["delta"].get("content") if chat else choice["text"]
                choices.setdefault(choice["index"], []).append(text or "")
                finishes[choice["index"]] = choice.get("finish_reason") or finishes.get(choice["index"])
    else:
        for choice in response.json()["choices"]:
            choices[choice["index"]] = [choice["message"]["content"] if chat else choice["text"]]
            finishes[choice["index"]] = choice["finish_reason"]
    assert sorted(choices) == list(range((body.get("n") or 1) * prompts)), where
    assert set(finishes.values()) <= {"stop", "length"}, where
    if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema") and not body.get("stop"):
        for index, parts in choices.items():
            if finishes[index] == "stop":  # a `length` ending may cut the JSON short
                document = json.loads("".join(parts))
                assert isinstance(document, dict), where
