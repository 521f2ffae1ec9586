"""The request parameters an engine honours, checked against what a request carries: anything else is refused by
name (400 `unsupported_parameter`), never silently dropped. The engines declare their sets in
`deepseek_server.engine.capabilities`; the checks live here, on the gateway's side, so the engine modules import
without FastAPI (a GPU machine for `bench/gpu_check.sh` may have torch and transformers and nothing of the server).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from deepseek_server.engine.capabilities import EngineCapabilities
from deepseek_server.errors import APIError

# Parameters whose default is true (vLLM's, and OpenAI's `parallel_tool_calls`): `false` asks for something (no
# generation prompt, no BOS, special tokens kept in the text, one tool call at most), so it counts as sent.
TRUE_BY_DEFAULT = {
    "chat": frozenset({"add_generation_prompt", "include_reasoning", "skip_special_tokens",
                       "spaces_between_special_tokens", "parallel_tool_calls"}),
    "text": frozenset({"add_special_tokens", "skip_special_tokens", "spaces_between_special_tokens"}),
}


def sent_parameters(body: BaseModel) -> dict[str, Any]:
    """The parameters a request body actually carries: declared fields the client set, and any unknown ones."""
    sent = {name: getattr(body, name) for name in body.model_fields_set}
    sent.update(body.model_extra or {})
    return sent


def reject_unsupported(capabilities: EngineCapabilities, kind: str, body: BaseModel) -> None:
    """400 `unsupported_parameter` naming the first parameter the engine does not honour.

    `null` and `false` mean "not asked for" in OpenAI's API (e.g. `"logprobs": false`), so they pass; except `false`
    for a parameter that is true by default.
    """
    supported = capabilities.parameters(kind)
    for name, value in sent_parameters(body).items():
        if name not in supported and value is not None and (value is not False or name in TRUE_BY_DEFAULT[kind]):
            raise _unsupported(capabilities, name)
    if capabilities.refuses_nested_fields:
        for name in body.model_fields_set:
            for param in _nested_extras(getattr(body, name), name):
                if not (name == "messages" and param.count(".") == 1):  # a message's own: see below, by its rules
                    raise _unsupported(capabilities, param)


def _nested_extras(value: Any, path: str) -> Iterator[str]:
    """The paths (`stream_options.x`, `messages[0].content[1].y`) of unknown fields set (not null or false) inside
    `value`, a validated parameter."""
    if isinstance(value, BaseModel):
        for name, extra in (value.model_extra or {}).items():
            if extra is not None and extra is not False:
                yield f"{path}.{name}"
        for name in value.model_fields_set:
            yield from _nested_extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nested_extras(item, f"{path}[{index}]")


def _unsupported(capabilities: EngineCapabilities, param: str) -> APIError:
    return APIError(400, f"The parameter '{param}' is not supported by this server's engine ({capabilities.name}). "
                    "Remove it from the request.", param=param, code="unsupported_parameter")


def reject_unsupported_message_fields(capabilities: EngineCapabilities, messages: list[BaseModel]) -> None:
    """400 `unsupported_parameter` naming the first message field (e.g. `messages[2].tool_calls`) the engine does
    not honour."""
    if capabilities.message_fields is None:
        return
    for index, message in enumerate(messages):
        for name, value in (message.model_extra or {}).items():
            if name not in capabilities.message_fields and value is not None:
                raise _unsupported(capabilities, f"messages[{index}].{name}")
