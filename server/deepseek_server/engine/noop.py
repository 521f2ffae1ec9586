"""An engine with no model: echoes a fixed reply at once. For measuring the API layer's own cost, and tests of it."""

from __future__ import annotations

import asyncio

from deepseek_server.engine.base import FinishReason, GenerationRequest, GenerationResult, GenerationStream, TextDelta
from deepseek_server.engine.capabilities import NO_MODEL

_REPLY = ("ok ", "from ", "the ", "no-op ", "engine ")


class NoopEngine:
    """Tokens are whitespace-separated words; generation yields `_REPLY` cut to max_new_tokens."""

    capabilities = NO_MODEL
    sampling_defaults: dict[str, float] = {}

    def __init__(self, model_name: str = "noop", max_model_len: int = 4096, max_new_tokens: int = 256) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_new_tokens = max_new_tokens
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        return 0

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [len(w) for m in messages for w in (m["role"] + " " + m["content"]).split()]

    def encode_text(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(request, lambda s: None)
        count = min(request.max_new_tokens, len(_REPLY))
        for word in _REPLY[:count]:
            stream.queue.put_nowait(TextDelta(word, 1))
        reason: FinishReason = "length" if count < len(_REPLY) else "stop"
        stream.queue.put_nowait(GenerationResult(reason, len(request.prompt_ids), count))
        return stream

    async def start(self) -> None:
        await asyncio.sleep(0)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
