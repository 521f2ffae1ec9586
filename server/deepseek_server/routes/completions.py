"""OpenAI inference routes: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from deepseek_server.auth.dependency import require_scope
from deepseek_server.auth.guard import SCOPE_PREDICT
from deepseek_server.auth.tokens import Principal
from deepseek_server.body_limit import replaying
from deepseek_server.engine.capabilities import capabilities_of
from deepseek_server.errors import APIError
from deepseek_server.generation import plan_call, respond, serving_engine
from deepseek_server.parameters import reject_unsupported, reject_unsupported_message_fields
from deepseek_server.relay import relay_call
from deepseek_server.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from deepseek_server.services import Services

router = APIRouter()
PROMPT_PREVIEW_CHARS = 200
INLINE_TOKENIZE_CHARS = 4096


async def _encode(encode: Callable[[Any], list[int]], prompt: Any, characters: int) -> list[int]:
    """Tokenize (and template) a long prompt off the event loop; a short one inline, where a thread hop would cost
    more than the work (a few thousand characters take well under a millisecond)."""
    if characters > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(encode, prompt)
    return encode(prompt)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def template_message(message: ChatMessage) -> dict[str, str]:
    """A message as the chat template takes it: `developer` is OpenAI's newer name for `system` (DeepSeek's
    templates know only `system`), and a participant's `name` is passed on for templates that use it."""
    out = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    return out


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(require_scope(SCOPE_PREDICT))
                           ) -> Response:
    """Chat completion, streamed as SSE when `stream` is true."""
    services = _services(request)
    request.state.model = body.model
    engine = serving_engine(services, body.model)
    capabilities = capabilities_of(engine)
    reject_unsupported(capabilities, "chat", body)
    reject_unsupported_message_fields(capabilities, list(body.messages))
    messages = [template_message(m) for m in body.messages]
    if services.settings.audit_prompts:
        request.state.prompt_text = messages[-1]["content"]  # masked and cut when recorded
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if capabilities.relays_openai:
        return await relay_call(services, request, principal, engine, "chat", body,  # type: ignore[arg-type]
                                body.requested_max_tokens(), max_param)
    try:
        prompt_ids = await _encode(engine.encode_chat, messages, sum(len(m["content"] or "") for m in messages))
    except Exception as exc:  # template errors are the caller's messages not fitting the model's format
        raise APIError(400, f"The messages could not be formatted with the model's chat template: {exc}",
                       param="messages", code="invalid_value") from exc
    _refuse_tokens_outside_vocabulary(engine, prompt_ids, "messages")
    call = plan_call(services, engine, "chat", body, prompt_ids, body.requested_max_tokens(), "messages", max_param)
    return await respond(services, request, principal, engine, call)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request,
                      principal: Principal = Depends(require_scope(SCOPE_PREDICT))
                      ) -> Response:
    """Text completion of `prompt`, streamed as SSE when `stream` is true."""
    services = _services(request)
    request.state.model = body.model
    engine = serving_engine(services, body.model)
    capabilities = capabilities_of(engine)
    reject_unsupported(capabilities, "text", body)
    prompts = body.prompts()
    if services.settings.audit_prompts:  # the first prompt's text, masked and cut when recorded; never token ids,
        first = prompts[0]                # which no mask reads but any tokenizer turns back into text
        request.state.prompt_text = first if isinstance(first, str) else f"[{len(first)} token ids]"
    if capabilities.relays_openai:
        return await relay_call(services, request, principal, engine, "text", body,  # type: ignore[arg-type]
                                body.max_tokens)
    if body.choices() > MAX_CHOICES:
        raise APIError(400, f"This request asks for {body.choices()} choices ({len(prompts)} prompts, n={body.n or 1});"
                       f" this server answers at most {MAX_CHOICES} per request.", param="prompt",
                       code="invalid_value")
    if len(prompts) == 1 and isinstance(prompts[0], str):
        encoded = [await _encode(engine.encode_text, prompts[0], len(prompts[0]))]
    else:  # all the texts in one go: on the loop only when all of them together are short
        def encode_all(texts: list[str | list[int]]) -> list[list[int]]:
            return [engine.encode_text(p) if isinstance(p, str) else _in_vocabulary(engine, p) for p in texts]

        encoded = await _encode(encode_all, prompts, sum(len(p) for p in prompts if isinstance(p, str)))
    calls = []
    fingerprint = None  # the request's: the same for each of its prompts
    ceiling = min(services.settings.max_new_tokens, engine.max_new_tokens)
    for prompt, prompt_ids in zip(prompts, encoded, strict=True):
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        if isinstance(prompt, str):  # token ids as sent were checked as they came
            _refuse_tokens_outside_vocabulary(engine, prompt_ids, "prompt")
        calls.append(plan_call(services, engine, "text", body, prompt_ids,
                               body.max_tokens_for(engine.max_model_len - len(prompt_ids), ceiling), "prompt",
                               fingerprint=fingerprint))
        fingerprint = calls[-1].fingerprint
    call = calls[0] if len(calls) == 1 else dataclasses.replace(
        calls[0], prompt_tokens=sum(c.prompt_tokens for c in calls), requests=[r for c in calls for r in c.requests])
    return await respond(services, request, principal, engine, call)


def _outside_vocabulary(engine: Any, prompt_ids: list[int]) -> tuple[int, list[int]] | None:
    """(the vocabulary size, the prompt's token ids the model has no embedding for, in order) where there are any."""
    vocab_size = getattr(engine, "vocab_size", None)
    if vocab_size is None or max(prompt_ids, default=0) < vocab_size:
        return None
    return vocab_size, [token for token in prompt_ids if token >= vocab_size]


def _refuse_tokens_outside_vocabulary(engine: Any, prompt_ids: list[int], param: str) -> None:
    """400 for text that the tokenizer turned into a token the model has no embedding for: a special token the
    tokenizer adds beyond the model's vocabulary (a checkpoint can ship one), written out in the text."""
    found = _outside_vocabulary(engine, prompt_ids)
    if found is not None:
        vocab_size, outside = found
        raise APIError(400, f"Text in `{param}` encodes to token ids outside the model's vocabulary "
                       f"(0..{vocab_size - 1}): {sorted(set(outside))[:5]}, most likely a special token of the "
                       "tokenizer written out in the text. Leave it out.", param=param, code="invalid_value")


def _in_vocabulary(engine: Any, prompt_ids: list[int]) -> list[int]:
    """A prompt of token ids, as sent: 400 for an id the model has no token for."""
    found = _outside_vocabulary(engine, prompt_ids)
    if found is not None:
        vocab_size, outside = found
        raise APIError(400, f"The prompt has token ids outside the vocabulary (0..{vocab_size - 1}): {outside[:5]}.",
                       param="prompt", code="invalid_value")
    return prompt_ids


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(require_scope(None))) -> ModelList:
    """The one model this server serves (any valid key may ask)."""
    services = _services(request)
    engine = services.engine
    name = engine.model_name if engine is not None else services.settings.served_model_name()
    card = ModelCard(id=name, created=services.started_at,
                     max_model_len=engine.max_model_len if engine is not None else None)
    return ModelList(data=[card])


# `:path`: model ids are Hugging Face names such as `deepseek-ai/deepseek-llm-7b-chat`, and the openai client puts the
# id into the URL as it is (`/v1/models/deepseek-ai/deepseek-llm-7b-chat`).
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request,
                         principal: Principal = Depends(require_scope(None))) -> ModelCard:
    models = await list_models(request, principal)
    for card in models.data:
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                   param="model", code="model_not_found")


# --------------------------------------------------------------------------------------------- direct routes
_FASTAPI_ROUTE = "deepseek.fastapi_route"  # in a request's scope: the direct route handed the request over


class DirectCompletionRoute(Route):
    """POST `path` served without FastAPI's per-request machinery, with the same steps and the same functions.

    FastAPI answers a request by building a dependency graph's values (reading the body, running `require_scope`,
    validating the body into its model) and wrapping the endpoint's response; for a completion that is a third of the
    server's own CPU per request (about 130 of 440 us relaying a one-token stream here), and in front of vLLM every
    request pays it before the engine sees it. This route does what those steps amount to for a well-formed request:
    the body parsed as JSON into the same model, the caller authenticated by the same dependency, the same endpoint
    function called. Any request it would answer differently from FastAPI goes to FastAPI's route instead, with the
    body it read: no or another content type, a body that is not JSON, a validation error. So errors (and their order:
    a body that is not JSON before the key, the key before the body's fields), and the OpenAPI schema, are FastAPI's.
    """

    def __init__(self, path: str, model: type[BaseModel], endpoint: Callable[..., Awaitable[Response]],
                 fallback: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        super().__init__(path, endpoint, methods=["POST"], include_in_schema=False)
        self.model, self.handler, self.fallback = model, endpoint, fallback
        self.authenticate = require_scope(SCOPE_PREDICT)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "POST" or _FASTAPI_ROUTE in scope:
            return Match.NONE, {}
        return super().matches(scope)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self  # the metrics' and audit's route label: this path, as FastAPI's route has it
        request = Request(scope, receive)
        raw = await request.body()
        body = self._parse(request, raw)
        if body is None:
            scope[_FASTAPI_ROUTE] = True
            await self.fallback(scope, replaying(raw, receive), send)
            return
        principal = await self.authenticate(request)
        response = await self.handler(body, request, principal)
        await response(scope, receive, send)

    def _parse(self, request: Request, raw: bytes) -> BaseModel | None:
        """The body as the endpoint's model, or None where FastAPI's route should answer."""
        content_type = request.headers.get("content-type")
        if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
            return None
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            return None
        if not isinstance(document, dict):
            return None
        try:
            return self.model.model_validate(document)
        except ValidationError:
            return None


def install_direct_routes(app: FastAPI) -> None:
    """Put the direct routes of both completions in front of FastAPI's (which stay for everything else)."""
    app.router.routes[0:0] = [
        DirectCompletionRoute("/v1/chat/completions", ChatCompletionRequest, chat_completions, app.router),
        DirectCompletionRoute("/v1/completions", CompletionRequest, completions, app.router),
    ]
