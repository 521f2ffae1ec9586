"""Batching engine: requests in flight are decoded together, one token per step for every row.

Continuous batching where the model's KV cache allows it (plain per-layer key/value tensors, checked at warm-up):
a request that arrives while others decode is prefilled and joins the running batch at the next step, and a
finished or cancelled row leaves it at once (see `running_batch`). Otherwise (sliding-window or hybrid caches) it
falls back to dynamic batching: requests waiting when a batch ends start the next one together.
Every row keeps its own temperature, top-p, seed, stop strings and token budget. The model runs in one worker thread
so the event loop keeps serving while it computes.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_server.engine.base import FinishReason, GenerationRequest, GenerationResult, GenerationStream, TextDelta
from deepseek_server.engine.loading import LoadedModel
from deepseek_server.engine.running_batch import BatchTensors, cache_is_joinable, make_growable
from deepseek_server.engine.sampling import sample_rows
from deepseek_server.engine.text_assembly import TextAssembler

log = logging.getLogger(__name__)


class BatchedEngine:
    """An `Engine` over a transformers causal LM with dynamic batching."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        model_name: str,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        max_new_tokens: int = 256,
        batch_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len or loaded.max_position_embeddings, loaded.max_position_embeddings)
        self.max_new_tokens = max_new_tokens
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self._pending: deque[GenerationStream] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="deepseek-engine")
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._rows: list[_Row] = []
        self.joinable: bool | None = None  # decided by the first prefill (warm-up): can rows join a running batch?
        self._ready = False
        # transformers 5 renamed `past_key_values` to `cache`; accept either
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._eos_ids = self._collect_eos_ids()

    # -- Engine interface -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(encoded, list):
            encoded = encoded["input_ids"]
        return [int(t) for t in encoded]

    def encode_text(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self._wakeup is None:
            raise RuntimeError("engine not started")
        stream = GenerationStream(request, self._cancel)
        self._pending.append(stream)
        self._wakeup.set()
        return stream

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="deepseek-engine-scheduler")
        warmup = self.submit(GenerationRequest(prompt_ids=self.encode_text("Hello"), max_new_tokens=2,
                                               temperature=0.0))
        await warmup.collect()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for row in list(self._rows):  # running rows end at the next step
            row.stream.cancelled = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for stream in list(self._pending):
            self._deliver(stream, GenerationResult("cancelled", len(stream.request.prompt_ids), 0))
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _cancel(self, stream: GenerationStream) -> None:
        # A stream still waiting leaves at once; one in a running batch is dropped by the worker at its next step.
        try:
            self._pending.remove(stream)
        except ValueError:
            return
        self._deliver(stream, GenerationResult("cancelled", len(stream.request.prompt_ids), 0))

    async def _schedule(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)  # let requests arriving together share the first step
            try:
                await self._loop.run_in_executor(self._executor, self._run)
            except Exception as exc:  # a failed batch fails its requests, never the scheduler
                log.exception("decoding failed")
                for stream in self._failed_rows():
                    self._deliver(stream, RuntimeError(f"generation failed: {exc}"))

    def _failed_rows(self) -> list[GenerationStream]:
        failed = [row.stream for row in self._rows if row.stream.result is None]
        self._rows = []
        return failed

    def _deliver(self, stream: GenerationStream, event: TextDelta | GenerationResult | BaseException) -> None:
        if isinstance(event, GenerationResult):
            stream.result = event
        assert self._loop is not None
        self._loop.call_soon_threadsafe(stream.queue.put_nowait, event)

    # -- the worker thread --------------------------------------------------------------------------------------

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list | tuple):
            ids.update(int(i) for i in configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :]

    def _flush(self, outbox: list[tuple[GenerationStream, TextDelta | GenerationResult]]) -> None:
        for stream, event in outbox:
            if isinstance(event, GenerationResult):
                stream.result = event
            stream.queue.put_nowait(event)

    def _prefill(self, streams: list[GenerationStream]) -> BatchTensors:
        from transformers import DynamicCache

        rows = len(streams)
        pad = int(self.tokenizer.pad_token_id)
        longest = max(len(s.request.prompt_ids) for s in streams)
        ids = torch.full((rows, longest), pad, dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        for i, stream in enumerate(streams):
            prompt = stream.request.prompt_ids
            ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, longest - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        if self.joinable is None:
            self.joinable = cache_is_joinable(cache)
            log.info("continuous batching %s for %s", "on" if self.joinable else "off (dynamic batching)",
                     type(self.model).__name__)
        if self.joinable:
            make_growable(cache)
        return BatchTensors(mask=mask, positions=positions[:, -1:], logits=logits, cache=cache)

    def _admit(self, room: int) -> list[_Row]:
        joining: list[_Row] = []
        while len(joining) < room:
            try:
                stream = self._pending.popleft()
            except IndexError:
                break
            if stream.cancelled:  # cancelled while being taken from the queue: it still needs its result
                self._deliver(stream, GenerationResult("cancelled", len(stream.request.prompt_ids), 0))
                continue
            request = stream.request
            generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
            joining.append(_Row(stream, TextAssembler(self._decode, request.stop), generator))
        return joining

    def _run(self) -> None:
        """Decode until no request is running or waiting."""
        assert self._loop is not None
        pad = int(self.tokenizer.pad_token_id)
        shared = torch.Generator().manual_seed(random.getrandbits(63))
        batch: BatchTensors | None = None
        self._rows = []
        # events of one decode step go to the event loop together: one wake-up per step, not per row
        outbox: list[tuple[GenerationStream, TextDelta | GenerationResult]] = []

        def finish(row: _Row, reason: FinishReason, text: str = "", tokens: int = 0) -> None:
            row.done = True
            if text or tokens:
                outbox.append((row.stream, TextDelta(text, tokens)))
            result = GenerationResult(reason, len(row.stream.request.prompt_ids), row.produced)
            row.stream.result = result  # seen at once by cancel(); the queue gets it with the outbox
            outbox.append((row.stream, result))

        with torch.inference_mode():
            while True:
                if batch is None or self.joinable:
                    joining = self._admit(self.max_batch_size - len(self._rows))
                    if joining:
                        self._rows.extend(joining)  # before prefill: if it fails, these fail too, not hang
                        incoming = self._prefill([row.stream for row in joining])
                        if batch is None:
                            batch = incoming
                        else:
                            batch.join(incoming)
                if batch is None or not self._rows:
                    break
                if self.on_batch is not None:
                    self.on_batch(sum(not row.done for row in self._rows))
                rows = self._rows
                for row in rows:
                    if not row.done and row.stream.cancelled:
                        finish(row, "cancelled")
                active = [i for i, row in enumerate(rows) if not row.done]
                picked = sample_rows(batch.logits, active, [r.stream.request.temperature for r in rows],
                                     [r.stream.request.top_p for r in rows], [r.generator for r in rows], shared)
                next_tokens = [pad] * len(rows)
                for i in active:
                    row, token = rows[i], picked[i]
                    next_tokens[i] = token
                    row.produced += 1
                    if token in self._eos_ids:
                        finish(row, "stop", row.assembler.finish(), 1)
                        continue
                    text = row.assembler.add(token)
                    if row.assembler.stopped:
                        finish(row, "stop", text, 1)
                    elif row.produced >= row.stream.request.max_new_tokens:
                        finish(row, "length", text + row.assembler.finish(), 1)
                    else:
                        outbox.append((row.stream, TextDelta(text, 1)))
                if outbox:
                    self._loop.call_soon_threadsafe(self._flush, outbox)
                    outbox = []
                live = [i for i, row in enumerate(rows) if not row.done]
                if not live:
                    batch, self._rows = None, []
                    continue
                if self.joinable and len(live) < len(rows):
                    batch.keep(live)
                    self._rows = [rows[i] for i in live]
                    next_tokens = [next_tokens[i] for i in live]
                step = torch.tensor(next_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
                batch.mask = F.pad(batch.mask, (0, 1), value=1)
                batch.positions = batch.positions + 1
                batch.logits = self._forward(step, batch.mask, batch.positions, batch.cache)


@dataclass
class _Row:
    """One sequence in the running batch."""

    stream: GenerationStream
    assembler: TextAssembler
    generator: torch.Generator | None
    produced: int = 0
    done: bool = False
