"""Batching engine: requests in flight are decoded together, one token per step for every row.

Continuous batching where the model's KV cache allows it (plain per-layer key/value tensors, checked at warm-up):
a request that arrives while others decode is prefilled and joins the running batch at the next step, and a
finished or cancelled row leaves it at once (see `running_batch`). Otherwise (sliding-window or hybrid caches) it
falls back to dynamic batching: requests waiting when a batch ends start the next one together.
Every row keeps its own temperature, top-p, seed, penalties, logit bias, JSON constraint, stop strings and token
budget. The model runs in one worker thread so the event loop keeps serving while it computes.

Memory: the KV cache is a rectangle, rows x the longest row, so a request is admitted only while (rows + 1) x the
longest (prompt + max_tokens) stays within the KV token budget; otherwise it waits, first come first served, for at
most `admission_wait_s`, then is refused (`EngineBusy`, a 503 with Retry-After). At most `max_prefill_tokens`
prompt tokens are prefilled per step (a longer prompt is prefilled in chunks of that size). Running out of memory
while prefilling fails only the joining request that needed it; while decoding, the row that joined last is dropped
and the step retried, so the rows that were running before keep going. Once no request has run for
`heap_trim_idle_s`, the worker gives the C heap's free pages back to the OS (`native_memory.release_free_heap`).
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

from deepseek_server.engine.base import (
    ANY_JSON_OBJECT,
    EngineBusy,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    TextDelta,
    TokenLogprob,
)
from deepseek_server.engine.capabilities import BUILTIN
from deepseek_server.engine.json_constraint import JsonGrammars, JsonMatcher
from deepseek_server.engine.kv_cache import kv_bytes_per_token, kv_tokens_for_memory
from deepseek_server.engine.loading import LoadedModel
from deepseek_server.engine.native_memory import release_free_heap
from deepseek_server.engine.running_batch import BatchTensors, cache_is_joinable, make_growable
from deepseek_server.engine.sampling import bias, model_sampling_defaults, penalize, sample_rows, top_logprobs
from deepseek_server.engine.text_assembly import TextAssembler

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OOM error, or the RuntimeError an allocator raises when a tensor does not fit."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in message for s in ("out of memory", "can't allocate memory", "failed to allocate"))


def prefer_fused_attention() -> None:
    """Keep PyTorch's attention (SDPA) off cuDNN's backend, for this process.

    A batch's decode steps attend through a padding mask one column longer each step. Given a mask, SDPA prefers
    cuDNN's attention on Hopper GPUs, which prepares a plan for each new shape: on an H200 with deepseek-llm-7b's
    shape that cost 1.2 ms of CPU per layer and step, so a step of 16 rows took 56 ms against 18.5 ms with the
    memory-efficient kernel (`bench/gpu_check.py`). The flash and memory-efficient kernels and the math fallback
    stay enabled.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


class BatchedEngine:
    """An `Engine` over a transformers causal LM with dynamic batching."""

    capabilities = BUILTIN

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
        kv_cache_tokens: int | None = None,
        max_prefill_tokens: int | None = None,
        admission_wait_s: float = 30.0,
        heap_trim_idle_s: float | None = 1.0,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.model_name = model_name
        # the model's own sampling defaults, as vLLM takes them from its generation config
        self.sampling_defaults, unapplied = model_sampling_defaults(getattr(self.model, "generation_config", None))
        if self.sampling_defaults:
            log.info("requests that do not set them get the model's sampling defaults %s", self.sampling_defaults)
        if unapplied:
            log.warning("the model's generation config sets %s, which the builtin engine does not apply (vLLM "
                        "does): requests are sampled without them", unapplied)
        if self.device.type == "cuda":
            prefer_fused_attention()
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len or loaded.max_position_embeddings, loaded.max_position_embeddings)
        # KV token budget: every request must fit alone, so it also bounds the context length
        self.kv_cache_tokens = kv_cache_tokens
        if kv_cache_tokens is not None:
            self.max_model_len = min(self.max_model_len, kv_cache_tokens)
        self.max_prefill_tokens = max_prefill_tokens
        self.admission_wait_s = admission_wait_s
        self.heap_trim_idle_s = heap_trim_idle_s
        self.max_new_tokens = max_new_tokens
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self._pending: deque[GenerationStream] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="deepseek-engine")
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._rows: list[_Row] = []
        self._joining: list[_Row] = []
        self._grammars: JsonGrammars | None = None
        self._token_texts: dict[int, str] = {}
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

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(encoded, list):
            encoded = encoded["input_ids"]
        return [int(t) for t in encoded]

    def encode_text(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def check_json_schema(self, schema: str) -> None:
        """Raise `JsonConstraintError` (a ValueError) when the output cannot be constrained to `schema`."""
        self._json_grammars().check(schema)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self._wakeup is None or self._loop is None:
            raise RuntimeError("engine not started")
        stream = GenerationStream(request, self._cancel)
        stream.admission = self._loop.create_future()
        timer = self._loop.call_later(self.admission_wait_s, self._expire, stream)
        stream.admission.add_done_callback(lambda _: timer.cancel())
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
        # the vocabulary's grammar tables take a while for a large tokenizer: build them now, not in a request
        await asyncio.to_thread(self.check_json_schema, ANY_JSON_OBJECT)
        if self.kv_cache_tokens is None and self.device.type == "cuda":
            self._size_kv_budget()
        self._ready = True

    def _size_kv_budget(self) -> None:
        """On GPUs with no budget given: what the GPUs' free memory after loading and warm-up holds."""
        devices = sorted({p.device for p in self.model.parameters() if p.device.type == "cuda"}, key=str)
        free = sum(torch.cuda.mem_get_info(d)[0] for d in devices)
        element = torch.empty((), dtype=self.model.dtype).element_size()  # the cache is in compute precision
        self.kv_cache_tokens = kv_tokens_for_memory(free, kv_bytes_per_token(self.model.config, element))
        self.max_model_len = min(self.max_model_len, self.kv_cache_tokens)
        log.info("KV-cache budget: %d tokens (%.1f GiB free on %d GPU(s)); context limit %d", self.kv_cache_tokens,
                 free / 2**30, len(devices), self.max_model_len)

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
        worked = False  # since the heap was last trimmed
        while True:
            if worked and self.heap_trim_idle_s is not None:
                try:  # not asyncio.wait_for: in 3.11 it can swallow a cancellation (stop) that meets a wake-up
                    async with asyncio.timeout(self.heap_trim_idle_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    # idle: in the worker, so no step runs meanwhile; a request arriving then waits for it (6 to
                    # 70 ms measured after bursts that left 80 to 450 MB free)
                    await self._loop.run_in_executor(self._executor, release_free_heap)
                    worked = False
                    continue
            else:
                await self._wakeup.wait()
            self._wakeup.clear()
            worked = True
            if self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)  # let requests arriving together share the first step
            try:
                await self._loop.run_in_executor(self._executor, self._run)
            except Exception as exc:  # a failed batch fails its requests, never the scheduler
                log.exception("decoding failed")
                for stream in self._failed_rows():
                    self._deliver(stream, RuntimeError(f"generation failed: {exc}"))

    def _failed_rows(self) -> list[GenerationStream]:
        failed = [row.stream for row in self._rows + self._joining if row.stream.result is None]
        self._rows, self._joining = [], []
        return failed

    def _expire(self, stream: GenerationStream) -> None:
        """On the event loop: a request still waiting for memory after `admission_wait_s` is refused."""
        try:
            self._pending.remove(stream)
        except ValueError:
            return  # taken by the worker meanwhile
        self._deliver(stream, EngineBusy(f"the server is at its KV-cache capacity: the request waited "
                                         f"{self.admission_wait_s:g} s for memory", retry_after_s=1))

    def _deliver(self, stream: GenerationStream, event: TextDelta | GenerationResult | BaseException) -> None:
        if isinstance(event, GenerationResult):
            stream.result = event
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put, stream, event)

    @staticmethod
    def _put(stream: GenerationStream, event: TextDelta | GenerationResult | BaseException) -> None:
        """On the event loop: queue `event`; a stream that ends or fails before running is settled with it."""
        if isinstance(event, BaseException | GenerationResult):
            _settle(stream, event if isinstance(event, BaseException) else None)
        stream.queue.put_nowait(event)

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
                _settle(stream, None)
            stream.queue.put_nowait(event)

    def _json_grammars(self) -> JsonGrammars:
        if self._grammars is None:
            self._grammars = JsonGrammars(self.tokenizer, self.vocab_size, self._eos_ids)
        return self._grammars

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = str(self.tokenizer.decode([token]))
        return text

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
        # prompts longer than the per-step prefill cap go through the model in chunks of it, so activations stay
        # bounded by the cap whatever the prompt length
        chunk = max(1, self.max_prefill_tokens // rows) if self.max_prefill_tokens else longest
        for begin in range(0, longest, chunk):
            end = min(longest, begin + chunk)
            logits = self._forward(ids[:, begin:end], mask[:, :end], positions[:, begin:end], cache)
        if self.joinable is None:
            self.joinable = cache_is_joinable(cache)
            log.info("continuous batching %s for %s", "on" if self.joinable else "off (dynamic batching)",
                     type(self.model).__name__)
        if self.joinable:
            make_growable(cache)
        return BatchTensors(mask=mask, positions=positions[:, -1:], logits=logits, cache=cache)

    def _fits(self, running: list[GenerationRequest], joining: list[GenerationRequest],
              request: GenerationRequest) -> bool:
        """Whether `request` may join the running and joining requests within the KV budget and the prefill cap.
        A request alone always goes (the context limit already keeps it within the budget)."""
        if self.kv_cache_tokens is not None and (running or joining):
            longest = max(_reserved(r) for r in [*running, *joining, request])
            if (len(running) + len(joining) + 1) * longest > self.kv_cache_tokens:
                return False
        if self.max_prefill_tokens is not None and joining:  # a lone prompt is prefilled in chunks instead
            longest_prompt = max(len(r.prompt_ids) for r in [*joining, request])
            if (len(joining) + 1) * longest_prompt > self.max_prefill_tokens:
                return False
        return True

    def _admit(self, room: int) -> list[_Row]:
        joining: list[_Row] = []
        running = [row.stream.request for row in self._rows]
        while len(joining) < room:
            try:
                head = self._pending[0]
            except IndexError:
                break
            if not head.cancelled and not self._fits(running, [r.stream.request for r in joining], head.request):
                break  # first come, first served: later requests wait behind it
            try:
                stream = self._pending.popleft()
            except IndexError:  # cancelled or expired on the event loop meanwhile
                break
            if stream.cancelled:  # cancelled while being taken from the queue: it still needs its result
                self._deliver(stream, GenerationResult("cancelled", len(stream.request.prompt_ids), 0))
                continue
            request = stream.request
            generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
            row = _Row(stream, TextAssembler(self._decode, request.stop), generator)
            if request.json_schema is not None:
                try:
                    row.matcher = self._json_grammars().matcher(request.json_schema)
                except ValueError as exc:
                    self._deliver(stream, exc)
                    continue
            joining.append(row)
        return joining

    def _prefill_joining(self, joining: list[_Row]) -> BatchTensors | None:
        """Prefill `joining` together; on failure, alone, so that only a request that cannot run fails.

        Returns the prefilled rows' tensors (None when all failed); `self._joining` keeps the rows that succeeded.
        """
        self._joining = joining
        try:
            return self._prefill([row.stream for row in joining])
        except Exception as exc:
            self._joining = []
            if len(joining) == 1 or not is_out_of_memory(exc):
                self._fail(joining, exc)
                return None
        self._release_memory()
        batch: BatchTensors | None = None
        kept: list[_Row] = []
        for row in joining:
            self._joining = [*kept, row]
            try:
                incoming = self._prefill([row.stream])
                if batch is None:
                    batch = incoming
                else:
                    batch.join(incoming)
                kept.append(row)
            except Exception as exc:
                self._joining = kept
                self._fail([row], exc)
        self._joining = kept
        return batch

    def _fail(self, rows: list[_Row], exc: BaseException) -> None:
        """Fail `rows` alone with what went wrong: out of memory is `EngineBusy` (retry later), the rest an error."""
        if is_out_of_memory(exc):
            log.warning("out of memory for %d request(s) of %d prompt tokens; failing them alone", len(rows),
                        max(len(r.stream.request.prompt_ids) for r in rows))
            self._release_memory()
            error: BaseException = EngineBusy("the server ran out of memory for this request; retry later or "
                                              "send a shorter prompt or max_tokens", retry_after_s=5)
        else:
            log.error("generation failed for %d request(s): %s", len(rows), exc)
            error = RuntimeError(f"generation failed: {exc}")
        for row in rows:
            row.done = True
            row.stream.result = GenerationResult("cancelled", len(row.stream.request.prompt_ids), row.produced)
            self._deliver(row.stream, error)

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _join(self, batch: BatchTensors | None) -> BatchTensors | None:
        """Admit waiting requests that fit, prefill them and join them to `batch` (or start one)."""
        joining = self._admit(self.max_batch_size - len(self._rows))
        if not joining:
            return batch
        incoming = self._prefill_joining(joining)
        joined = self._joining
        self._joining = []
        if incoming is None:
            return batch
        if batch is not None:
            try:
                batch.join(incoming)
            except Exception as exc:  # the running rows are untouched (see BatchTensors.join)
                self._fail(joined, exc)
                return batch
        else:
            batch = incoming
        self._rows.extend(joined)
        assert self._loop is not None
        for row in joined:
            self._loop.call_soon_threadsafe(_settle, row.stream, None)
        return batch

    def _pick(self, rows: list[_Row], active: list[int], logits: torch.Tensor, shared: torch.Generator
              ) -> dict[int, int]:
        """Sample each active row's next token after its own penalties, logit bias and JSON constraint. A row whose
        own shaping fails is failed alone (done, with the error) and gets no token; the others go on."""
        shaped = [i for i in active if rows[i].shapes_logits]
        if shaped:
            logits = logits.to(torch.float32, copy=True)  # the raw logits stay for log-probabilities
            for i in shaped:
                row, request = rows[i], rows[i].stream.request
                try:
                    adjusted = logits[i]
                    if row.counts is not None:
                        adjusted = penalize(adjusted, row.counts, request.presence_penalty,
                                            request.frequency_penalty)
                    adjusted = bias(adjusted, request.logit_bias)
                    if row.matcher is not None:
                        adjusted = row.matcher.mask(adjusted)
                    logits[i] = adjusted
                except Exception as exc:
                    self._fail([row], exc)
            active = [i for i in active if not rows[i].done]
        return sample_rows(logits, active, [r.stream.request.temperature for r in rows],
                           [r.stream.request.top_p for r in rows], [r.generator for r in rows], shared)

    def _logprob(self, logits: torch.Tensor, token: int, alternatives: int) -> TokenLogprob:
        chosen, top = top_logprobs(logits, token, alternatives)
        return TokenLogprob(self._token_text(token), chosen, tuple((self._token_text(t), lp) for t, lp in top))

    def _decode_step(self, batch: BatchTensors, next_tokens: list[int]) -> None:
        """Run one decode step. Out of memory drops the row that joined last and retries, while rows remain."""
        while True:
            mark = batch.step_mark()
            step = torch.tensor(next_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            batch.mask = F.pad(batch.mask, (0, 1), value=1)
            batch.positions = batch.positions + 1
            try:
                batch.logits = self._forward(step, batch.mask, batch.positions, batch.cache)
                return
            except Exception as exc:
                if mark is None or len(self._rows) < 2 or not is_out_of_memory(exc):
                    raise
                batch.roll_back(mark)
                self._release_memory()
                last = self._rows[-1]
                self._fail([last], exc)
                self._rows = self._rows[:-1]
                next_tokens = next_tokens[:-1]
                batch.keep(list(range(len(self._rows))))

    def _run(self) -> None:
        """Decode until no request is running or waiting."""
        assert self._loop is not None
        pad = int(self.tokenizer.pad_token_id)
        shared = torch.Generator().manual_seed(random.getrandbits(63))
        batch: BatchTensors | None = None
        self._rows = []
        # events of one decode step go to the event loop together: one wake-up per step, not per row
        outbox: list[tuple[GenerationStream, TextDelta | GenerationResult]] = []

        def finish(row: _Row, reason: FinishReason, text: str = "", tokens: int = 0,
                   logprobs: tuple[TokenLogprob, ...] = ()) -> None:
            row.done = True
            if text or tokens:
                outbox.append((row.stream, TextDelta(text, tokens, logprobs)))
            result = GenerationResult(reason, len(row.stream.request.prompt_ids), row.produced)
            row.stream.result = result  # seen at once by cancel(); the queue gets it with the outbox
            outbox.append((row.stream, result))

        try:
            with torch.inference_mode():
                while True:
                    if batch is None or self.joinable:
                        batch = self._join(batch)
                    if batch is None or not self._rows:
                        if self._pending:
                            batch = None
                            continue  # those that came failed to prefill; the next ones still wait
                        break
                    if self.on_batch is not None:
                        self.on_batch(sum(not row.done for row in self._rows))
                    rows = self._rows
                    for row in rows:
                        if not row.done and row.stream.cancelled:
                            finish(row, "cancelled")
                    active = [i for i, row in enumerate(rows) if not row.done]
                    picked = self._pick(rows, active, batch.logits, shared)
                    next_tokens = [pad] * len(rows)
                    for i in active:
                        if i not in picked:  # failed alone while its token was picked
                            continue
                        row, token = rows[i], picked[i]
                        request = row.stream.request
                        next_tokens[i] = token
                        row.produced += 1
                        if token in self._eos_ids:
                            finish(row, "stop", row.assembler.finish(), 1)
                            continue
                        if request.presence_penalty or request.frequency_penalty:
                            if row.counts is None:
                                row.counts = torch.zeros(batch.logits.shape[-1], device=batch.logits.device)
                            row.counts[token] += 1
                        if row.matcher is not None:
                            try:
                                row.matcher.accept(token)
                            except Exception as exc:  # this row's grammar alone: the others go on
                                self._fail([row], exc)
                                continue
                        logprobs = () if request.logprobs is None else (
                            self._logprob(batch.logits[i], token, request.logprobs),)
                        text = row.assembler.add(token)
                        if row.assembler.stopped:
                            finish(row, "stop", text, 1, logprobs)
                        elif row.produced >= request.max_new_tokens:
                            finish(row, "length", text + row.assembler.finish(), 1, logprobs)
                        else:
                            outbox.append((row.stream, TextDelta(text, 1, logprobs)))
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
                    self._decode_step(batch, next_tokens)
        finally:
            if outbox:  # rows that finished in a step that then failed still get their events
                self._loop.call_soon_threadsafe(self._flush, outbox)


def _settle(stream: GenerationStream, error: BaseException | None) -> None:
    """On the event loop: the stream now runs (None) or never will (the error)."""
    if stream.admission is not None and not stream.admission.done():
        stream.admission.set_result(error)


def _reserved(request: GenerationRequest) -> int:
    """KV-cache columns a request may come to need: its prompt and every token it may generate."""
    return len(request.prompt_ids) + request.max_new_tokens


@dataclass
class _Row:
    """One sequence in the running batch."""

    stream: GenerationStream
    assembler: TextAssembler
    generator: torch.Generator | None
    produced: int = 0
    done: bool = False
    matcher: JsonMatcher | None = None
    counts: torch.Tensor | None = None  # how often each token was generated, for presence/frequency penalties

    @property
    def shapes_logits(self) -> bool:
        request = self.stream.request
        return self.counts is not None or bool(request.logit_bias) or self.matcher is not None
