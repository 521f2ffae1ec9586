"""Log-probabilities in OpenAI's two shapes (pure functions): chat's `logprobs.content[]` and the legacy
completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepseek_server.engine.base import TokenLogprob


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}` as OpenAI's chat API returns it."""
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _utf8(e.token),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _utf8(t)} for t, lp in e.top]}
        for e in entries
    ]}


def text_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """The completions API's shape; `text_offset` is where the first token starts in the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    # OpenAI: "The API will always return the logprob of the sampled token, so there may be up to logprobs+1
    # elements" (vLLM does the same): the sampled token is in each `top_logprobs` entry, even with `logprobs: 0`
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**dict(e.top), e.token: e.logprob} for e in entries], "text_offset": offsets}


def logprobs_body(kind: str, entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    return chat_logprobs(entries) if kind == "chat" else text_logprobs(entries, text_offset)
