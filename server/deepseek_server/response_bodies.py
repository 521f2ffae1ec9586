"""OpenAI response bodies and SSE chunks for chat and text completions, as plain dicts (pure functions)."""

from __future__ import annotations

import json
from typing import Any, Literal

Kind = Literal["chat", "text"]


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_body(kind: Kind, call_id: str, created: int, model: str, texts: list[str], reasons: list[str],
              usage: dict[str, int], logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A non-streamed `chat.completion` or `text_completion`; `logprobs`: one body per choice when asked for."""
    each = logprobs if logprobs is not None else [None] * len(texts)
    if kind == "chat":
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(zip(texts, reasons, each, strict=True))
        ]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                   for i, (text, reason, lp) in enumerate(zip(texts, reasons, each, strict=True))]
        obj = "text_completion"
    return {"id": call_id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage,
            "system_fingerprint": None}


def chunk(kind: Kind, call_id: str, created: int, model: str, index: int, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, with_usage_field: bool = False,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk with one choice."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    body: dict[str, Any] = {"id": call_id, "object": obj, "created": created, "model": model, "choices": [choice],
                            "system_fingerprint": None}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(kind: Kind, call_id: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": call_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage,
            "system_fingerprint": None}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event. ASCII-only JSON: raw U+2028/U+2029/U+0085 in generated text would otherwise split the
    event for clients that break lines like str.splitlines (httpx's iter_lines does)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    return f"data: {payload}\n\n"


class TextChunks:
    """The SSE events of a stream's text chunks, from JSON encoded once per stream: per token only the text is
    encoded. Each event equals `sse(chunk(kind, ..., index, text=text, with_usage_field=...))`."""

    def __init__(self, kind: Kind, call_id: str, created: int, model: str, with_usage_field: bool) -> None:
        head = json.dumps({"id": call_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": model}, separators=(",", ":"), ensure_ascii=True)
        self._head = "data: " + head[:-1] + ',"choices":[{"index":'
        self._text_key = ',"delta":{"content":' if kind == "chat" else ',"text":'
        self._tail = ('}' if kind == "chat" else '') + ',"logprobs":null,"finish_reason":null}],' \
            '"system_fingerprint":null' + (',"usage":null' if with_usage_field else '') + '}\n\n'

    def event(self, index: int, text: str) -> str:
        return f"{self._head}{index}{self._text_key}{json.dumps(text, ensure_ascii=True)}{self._tail}"
