"""What an engine can do, as data the gateway reads: the OpenAI parameters it honours, and how it is called.

The gateway refuses any parameter outside an engine's set by name (400 `unsupported_parameter`; the checks are in
`deepseek_server.parameters`): a request is either answered as asked or refused, never answered with a parameter
silently dropped. This module is data only, so the engines import without the gateway's packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What every engine accepts on both routes.
_COMMON = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "n", "stop", "seed",
                     "presence_penalty", "frequency_penalty", "user"})


@dataclass(frozen=True)
class EngineCapabilities:
    """`chat`/`text`: request parameters honoured on /v1/chat/completions and /v1/completions.

    `relays_openai`: the engine is an OpenAI server the gateway relays requests to (rather than one that takes
    token ids in this process). `own_metrics`: the engine has Prometheus metrics of its own (GET /metrics/engine).
    """

    name: str
    chat: frozenset[str]
    text: frozenset[str]
    relays_openai: bool = False
    own_metrics: bool = False
    # fields a chat message may carry besides role and content; None: any, relayed as sent
    message_fields: frozenset[str] | None = frozenset({"name"})
    # unknown fields inside a parameter's object (`stream_options.continuous_usage_stats`,
    # `response_format.schema`, a content part's `cache_control`): refused by name, or (False) relayed as sent
    refuses_nested_fields: bool = True

    def parameters(self, kind: str) -> frozenset[str]:
        return self.chat if kind == "chat" else self.text


# The engine in this process: penalties, logit bias, log-probabilities and JSON output (json_object and
# json_schema, enforced while decoding); no tools, echo or suffix.
_BUILTIN_SAMPLING = frozenset({"logit_bias", "logprobs", "response_format"})
BUILTIN = EngineCapabilities(
    name="builtin",
    chat=_COMMON | _BUILTIN_SAMPLING | {"messages", "max_tokens", "max_completion_tokens", "top_logprobs"},
    text=_COMMON | _BUILTIN_SAMPLING | {"prompt", "max_tokens"},
)

# An engine with no model (for measuring the API layer): a fixed reply; it cannot honour anything that shapes
# tokens, so those are refused.
NO_MODEL = EngineCapabilities(
    name="noop",
    chat=_COMMON | {"messages", "max_tokens", "max_completion_tokens"},
    text=_COMMON | {"prompt", "max_tokens"},
)

# vLLM's OpenAI server. Its sampling and structured-output extensions are relayed; parameters that steer the engine's
# operation rather than the answer (scheduling priority, request ids, KV transfer, custom chat templates, extra
# engine arguments, prefix-cache salts) are not, so one key cannot affect other keys' requests.
_VLLM_SAMPLING = frozenset({
    "logit_bias", "logprobs", "response_format", "top_k", "min_p", "repetition_penalty",
    "length_penalty", "use_beam_search", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "echo", "add_special_tokens", "structured_outputs",
    "return_tokens_as_token_ids",
})
VLLM = EngineCapabilities(
    name="vllm",
    # `top_logprobs` and `bad_words` are chat's only: vLLM's completion request has neither field, and drops what it
    # does not know (with a warning in its own log)
    chat=_COMMON | _VLLM_SAMPLING | {
        "messages", "max_tokens", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
        "reasoning_effort", "include_reasoning", "add_generation_prompt", "continue_final_message",
        "chat_template_kwargs", "documents", "top_logprobs", "bad_words"},
    text=_COMMON | _VLLM_SAMPLING | {"prompt", "max_tokens"},
    relays_openai=True,
    own_metrics=True,
    message_fields=None,
    refuses_nested_fields=False,
)


def capabilities_of(engine: Any) -> EngineCapabilities:
    """The engine's declared capabilities; engines that take token ids in this process declare none: BUILTIN."""
    declared = getattr(engine, "capabilities", None)
    return declared if isinstance(declared, EngineCapabilities) else BUILTIN
