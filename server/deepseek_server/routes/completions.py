"""OpenAI inference routes: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from deepseek_server.auth.dependency import require_scope
from deepseek_server.auth.guard import SCOPE_PREDICT
from deepseek_server.auth.tokens import Principal
from deepseek_server.engine.capabilities import capabilities_of, reject_unsupported
from deepseek_server.errors import APIError
from deepseek_server.generation import plan_call, respond, serving_engine
from deepseek_server.relay import relay_call
from deepseek_server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from deepseek_server.services import Services

router = APIRouter()
PROMPT_PREVIEW_CHARS = 200


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


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
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if services.settings.audit_prompts:
        request.state.prompt_preview = messages[-1]["content"][:PROMPT_PREVIEW_CHARS]
    if capabilities.relays_openai:
        return await relay_call(services, request, principal, engine, "chat", body,  # type: ignore[arg-type]
                                body.requested_max_tokens())
    try:
        prompt_ids = engine.encode_chat(messages)
    except Exception as exc:  # template errors are the caller's messages not fitting the model's format
        raise APIError(400, f"The messages could not be formatted with the model's chat template: {exc}",
                       param="messages", code="invalid_value") from exc
    call = plan_call(services, engine, "chat", body, prompt_ids, body.requested_max_tokens(), "messages")
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
    prompt = body.prompt_text()
    if services.settings.audit_prompts:
        request.state.prompt_preview = prompt[:PROMPT_PREVIEW_CHARS]
    if capabilities.relays_openai:
        return await relay_call(services, request, principal, engine, "text", body,  # type: ignore[arg-type]
                                body.max_tokens if "max_tokens" in body.model_fields_set else None)
    prompt_ids = engine.encode_text(prompt)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    call = plan_call(services, engine, "text", body, prompt_ids, body.max_tokens, "prompt")
    return await respond(services, request, principal, engine, call)


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(require_scope(None))) -> ModelList:
    """The one model this server serves (any valid key may ask)."""
    services = _services(request)
    engine = services.engine
    name = engine.model_name if engine is not None else services.settings.served_model_name()
    card = ModelCard(id=name, created=services.started_at,
                     max_model_len=engine.max_model_len if engine is not None else None)
    return ModelList(data=[card])


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request,
                         principal: Principal = Depends(require_scope(None))) -> ModelCard:
    models = await list_models(request, principal)
    for card in models.data:
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                   param="model", code="model_not_found")
