"""The engine interface the API layer depends on, and the stream a submitted request returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids and per-request sampling and stopping rules."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text (possibly empty when a token only completed part of a character) and tokens it took."""

    text: str
    tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """The last event of a stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | GenerationResult


@dataclass
class GenerationStream:
    """Async iterator over a request's events; `cancel()` frees its batch slot (e.g. when the client leaves)."""

    request: GenerationRequest
    _on_cancel: Callable[[GenerationStream], None]
    queue: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    result: GenerationResult | None = None

    def cancel(self) -> None:
        if not self.cancelled and self.result is None:
            self.cancelled = True
            self._on_cancel(self)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                self.result = item
                yield item
                return
            yield item

    async def collect(self) -> tuple[str, GenerationResult]:
        """Wait for the whole generation; returns (text, result)."""
        parts: list[str] = []
        async for event in self.events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise RuntimeError("generation stream ended without a result")


class Engine(Protocol):
    """What the API needs from an inference engine."""

    model_name: str
    max_model_len: int
    max_new_tokens: int

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def submit(self, request: GenerationRequest) -> GenerationStream: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def merged_events(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several streams as they come, tagged with the stream's index (for `n` > 1)."""
    if len(streams) == 1:
        async for event in streams[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for event in stream.events():
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            index, payload = item
            if isinstance(payload, BaseException):
                raise payload
            yield index, payload
    finally:
        for task in tasks:
            task.cancel()
