"""Request and response bodies of the OpenAI API subset this server speaks, with OpenAI's field names."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 8
# choices of one /v1/completions request on the builtin engine: prompts x n (vLLM sets no bound of its own)
MAX_CHOICES = 64
DEFAULT_COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's legacy API
MAX_STOP_SEQUENCES = 4


class TextContentPart(BaseModel):
    # unknown fields here, in `response_format` and in `stream_options` are kept (in `model_extra`): the engine's
    # capabilities decide whether they are relayed or refused by name
    model_config = ConfigDict(extra="allow")

    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":  # OpenAI's other parts (image_url, input_audio, file) need a model that reads them
            raise PydanticCustomError(
                "unsupported_content_part",
                "Content parts of type '{part}' are not supported: the models this server serves read text only; "
                "send the content as a string or as parts of type 'text'", {"part": value})
        return value


MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default `max_logprobs`
LOGIT_BIAS_LIMIT = 100.0


class ChatMessage(BaseModel):
    # Other message fields (`tool_calls`, `tool_call_id`, ...) are kept in `model_extra`: the engine's capabilities
    # decide whether they are relayed or refused by name.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # validated when not sent too: only an assistant's may be left out (or null), as in OpenAI's API
    content: str | list[TextContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")  # absent when the role itself was refused
        if (value is None or value == []) and role not in (None, "assistant"):  # no parts is no content
            raise PydanticCustomError("missing", "A {role} message needs content: a string, or an array of text "
                                      "parts (only an assistant's content may be null).", {"role": role})
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins text parts


def _null_is_false(value: Any) -> Any:
    """`null` for a flag means "not sent", as for every other parameter: the flag's default, false."""
    return False if value is None else value


def _needs(flag: str, message: str) -> Any:
    """A field validator refusing the field, when set, unless `flag` is true. A field validator, not a model one, so
    the error names the field; `flag` must be declared before it (validated by then; absent from `info.data` when it
    failed itself)."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get(flag):
            raise ValueError(message)
        return value
    return check


LONE_SURROGATE = "lone_surrogate"  # the pydantic error type; its context names the parameter


def _lone_surrogate(text: str) -> str | None:
    """The first half of a UTF-16 surrogate pair in `text`, as its JSON escape; None when there is none. JSON's
    `\\u` escapes can spell one half alone, and Python's parser keeps it: a string no UTF-8 encoder (the tokenizer,
    the audit log, the cache key) takes. A pair is already one character once parsed."""
    if text.isascii():
        return None
    try:
        text.encode()  # a fraction of a microsecond for a paragraph: faster than searching for the range
    except UnicodeEncodeError as error:
        return f"\\u{ord(text[error.start]):04x}"
    return None


def _param_at(location: Any) -> str | None:
    """`((None, 'messages'), 0), 'content')` (as the walk below nests them) -> `messages[0].content`."""
    parts: list[Any] = []
    while location is not None:
        location, part = location
        parts.append(part)
    out = ""
    for part in reversed(parts):
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def _refuse_lone_surrogates(document: Any) -> None:
    """Raise a `lone_surrogate` error naming the parameter (`messages[0].content`, `stop[1]`) of the first string or
    key of the request body that holds half a surrogate pair. Walked with a list, not recursion: the parser already
    took a body nested as deep as the interpreter's stack allows; locations are built as pairs, and spelled out only
    for the error."""
    pending: list[tuple[Any, Any]] = [(None, document)]
    while pending:
        location, value = pending.pop()
        if isinstance(value, str):
            half = _lone_surrogate(value)
            if half is not None:
                raise PydanticCustomError(LONE_SURROGATE, "{reason}", {"param": _param_at(location), "reason": (
                    f"the text holds {half}, half of a UTF-16 surrogate pair, which is no character. Send text as "
                    "UTF-8 or as \\u escapes of whole characters (one beyond U+FFFF takes both halves: "
                    "\\ud83d\\ude00)")})
        elif isinstance(value, dict):
            for key, item in value.items():
                half = _lone_surrogate(key)
                if half is not None:  # keys before their values: no location holds an unchecked key
                    raise PydanticCustomError(LONE_SURROGATE, "{reason}", {"param": _param_at(location), "reason": (
                        f"a {'key' if location else 'parameter name'} holds {half}, half of a UTF-16 surrogate "
                        "pair, which is no character")})
                if not isinstance(item, (int, float, bool)) and item is not None:
                    pending.append(((location, key), item))
        elif isinstance(value, list):
            pending.extend(((location, index), item) for index, item in enumerate(value)
                           if not isinstance(item, (int, float, bool)) and item is not None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False

    _include_usage_null = field_validator("include_usage", mode="before")(_null_is_false)


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`. OpenAI's reference marks `schema` optional, but vLLM refuses a request without
    one (400: no structured-output constraint), so both engines refuse it by name, as a missing parameter, rather
    than the builtin engine reading it as `{}`: any JSON value, a bare number included. `strict` is accepted and
    changes nothing: the schema is enforced while decoding either way."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    # `schema` would shadow a pydantic BaseModel attribute; the wire name stays `schema`
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _absent_schema_is_null(cls, data: Any) -> Any:
        """A missing `schema` as `null` ("not sent" either way), so both get the 400 below, with its hint, under
        the wire name (pydantic's own 'missing' error has neither)."""
        if isinstance(data, dict) and "schema" not in data and "json_schema" not in data:
            return {**data, "schema": None}
        return data

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_sent(cls, value: Any) -> Any:
        if value is None:
            raise PydanticCustomError("missing", "The output is constrained to this JSON Schema: send {} for any "
                                      "JSON value, or response_format {\"type\": \"json_object\"} for any "
                                      "JSON object.")
        return value


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self

    def schema_text(self) -> str | None:
        """The JSON Schema the output must match, as JSON text; None for free text."""
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.json_schema)
        return None


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions."""

    # Unknown parameters are kept (in `model_extra`): the engine's capabilities decide whether they are relayed to
    # it or refused by name, never silently dropped.
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    _stream_null = field_validator("stream", mode="before")(_null_is_false)

    @model_validator(mode="before")
    @classmethod
    def _whole_characters(cls, data: Any) -> Any:
        _refuse_lone_surrogates(data)
        return data

    _only_when_streaming = field_validator("stream_options")(
        _needs("stream", "stream_options can only be set when stream is true"))

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            # isdecimal, not isdigit: '²' is a digit but no number to int()
            if not key.isdecimal():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # as vLLM: 0 asks for no alternatives, so it is accepted without `logprobs` (and gives none)
        if value and not info.data.get("logprobs"):
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true")
        return value

    def choices(self) -> int:
        """How many choices the answer holds."""
        return self.n or 1

    def logprob_alternatives(self) -> int | None:
        """None when no log-probabilities are asked for, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_token_id(value: Any) -> bool:
    return type(value) is int and value >= 0  # not a bool, which is an int to Python


PROMPT_FORMS = ("a string, an array of strings, an array of token ids (non-negative integers), or an array of arrays "
                "of token ids, none of them empty")


class CompletionRequest(SamplingFields):
    # OpenAI's four forms: one prompt as text or as token ids, or several prompts (a choice per prompt and n, in
    # prompt order: choice i*n+j is prompt i's j-th)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # before max_tokens, whose check reads it
    # None (not sent, or null): OpenAI's default of 16, cut to what the context still holds (`max_tokens_for`);
    # 0 with `echo`: the prompt echoed, nothing generated (scoring a prompt by its log-probabilities), as in vLLM
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    _echo_null = field_validator("echo", mode="before")(_null_is_false)

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 1 (0 only "
                                      "with echo: the prompt alone, nothing generated)")
        return value

    def max_tokens_for(self, room: int, ceiling: int) -> int:
        """The completion's length limit when `room` tokens of the context are left after the prompt and the
        server gives at most `ceiling`: as sent, else 16 or what fits (a prompt near the end of the context still
        gets the tokens that fit, as with vLLM, and a server capped below 16 gives its cap)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return max(1, min(DEFAULT_COMPLETION_MAX_TOKENS, room, ceiling))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        """One of OpenAI's forms, checked here so that a wrong one gets one message, not one per form."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and (
                all(isinstance(item, str) for item in value) or all(_is_token_id(item) for item in value)
                or all(isinstance(item, list) and item and all(_is_token_id(token) for token in item)
                       for item in value)):
            return value
        raise ValueError(f"prompt must be {PROMPT_FORMS}")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def choices(self) -> int:
        return (self.n or 1) * len(self.prompts())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepseek-operator"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HistoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
