"""The engine interface the API layer depends on, and the stream a submitted request returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]

# `cancelled` ends a stream the engine stopped (client gone, server shutting down); OpenAI's API has no such value,
# and the text was cut short like a length limit cuts it, so clients are told `length`.
OPENAI_FINISH_REASONS: dict[str, str] = {"stop": "stop", "length": "length", "cancelled": "length"}

# The output must be a JSON object (OpenAI's `response_format: {"type": "json_object"}`).
ANY_JSON_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids and per-request sampling and stopping rules.

    `logit_bias`: (token id, bias) pairs added to the logits. `logprobs`: None for none, else how many most likely
    alternatives to report with each token's log-probability. `json_schema`: JSON Schema text the output must match.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    json_schema: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, and the most likely tokens at its position (best first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text (possibly empty when a token only completed part of a character) and tokens it took.

    `logprobs` has one entry per generated token when the request asked for them (the end-of-sequence token has none).
    """

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The last event of a stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | GenerationResult


class EngineBusy(RuntimeError):
    """The request could not be given memory in the engine (it waited too long, or running it ran out of memory);
    retrying later may succeed. `retry_after_s`: a hint for the client."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# identity, not field equality: a queue of streams finds and removes the very stream, and comparing whole prompts
# of different requests would be slow and could match the wrong one
@dataclass(eq=False)
class GenerationStream:
    """Async iterator over a request's events; `cancel()` frees its batch slot (e.g. when the client leaves).

    `admission`: set by engines that queue requests for memory; it resolves to None once the request runs, or to
    the error that kept it from running. Engines without such a queue leave it None (admitted at once).
    """

    request: GenerationRequest
    _on_cancel: Callable[[GenerationStream], None]
    queue: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    result: GenerationResult | None = None
    admission: asyncio.Future[BaseException | None] | None = None

    async def wait_admitted(self) -> None:
        """Return once the engine runs the request; raise what kept it from running (e.g. `EngineBusy`)."""
        if self.admission is None:
            return
        error = await asyncio.shield(self.admission)
        if error is not None:
            raise error

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
    # `temperature`/`top_p` of a request that does not set them, where the model has its own (else 1.0)
    sampling_defaults: dict[str, float]

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
