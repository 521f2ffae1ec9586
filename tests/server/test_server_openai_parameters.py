"""Every OpenAI parameter the built-in engine takes does what OpenAI documents; the rest are refused by name.
Driven through the official `openai` client against a live server on a tiny Llama."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from deepseek_server.app import create_app
from deepseek_server.engine.base import OPENAI_FINISH_REASONS
from deepseek_server.routes.completions import template_message
from deepseek_server.schemas import ChatMessage
from deepseek_server.settings import ServerSettings

from devcluster.testing.model_server import ServerThread

MODEL = "deepseek-tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(llama_server: ServerThread, token_factory: Callable[..., str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token_factory(), max_retries=0)


def completion_tokens(client: openai.OpenAI, **params: object) -> list[str]:
    options: dict[str, object] = {"max_tokens": 8, **params}
    reply = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, logprobs=0,
                                      **options)  # type: ignore[call-overload]
    assert reply.choices[0].logprobs is not None
    return list(reply.choices[0].logprobs.tokens or [])


def test_negative_penalties_repeat_the_first_token(client: openai.OpenAI) -> None:
    """A negative presence or frequency penalty raises every generated token, so greedy decoding repeats the
    first one (the tiny model's logits differ by far less than 2)."""
    plain = completion_tokens(client)
    assert len(set(plain)) > 1
    for penalty in ("presence_penalty", "frequency_penalty"):
        repeated = completion_tokens(client, **{penalty: -2.0})
        assert repeated[0] == plain[0]
        assert set(repeated) == {plain[0]}, penalty


def test_positive_presence_penalty_changes_a_repeating_answer(client: openai.OpenAI) -> None:
    plain = completion_tokens(client, max_tokens=24)
    penalized = completion_tokens(client, max_tokens=24, presence_penalty=2.0)
    assert len(set(plain)) < len(plain), "greedy decoding of the tiny model was expected to repeat itself"
    assert len(set(penalized)) > len(set(plain))
    assert penalized[0] == plain[0]  # nothing generated yet: the first token is unchanged


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, llama_server: ServerThread) -> None:
    tokenizer = llama_server.app.state.services.engine.tokenizer
    fox = tokenizer.encode("fox")[0]
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=1.0, logprobs=1,
                                       logit_bias={str(fox): 100})
    assert forced.choices[0].text == tokenizer.decode([fox]) * 4
    # log-probabilities are the model's own, before the bias (the tiny model spreads ~uniformly over 384 tokens)
    assert forced.choices[0].logprobs is not None
    assert all(lp < -1.0 for lp in forced.choices[0].logprobs.token_logprobs or [])
    plain = completion_tokens(client)
    banned = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                       logprobs=0, logit_bias={str(t): -100 for t in range(len(tokenizer))
                                                               if tokenizer.decode([t]) == plain[0]})
    assert banned.choices[0].logprobs is not None and banned.choices[0].logprobs.tokens
    assert plain[0] not in banned.choices[0].logprobs.tokens


def test_chat_logprobs_have_openais_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None
    assert len(entries) == reply.usage.completion_tokens or choice.finish_reason == "stop"
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the most likely
    without = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == choice.message.content

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content or [])
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_completion_logprobs_have_openais_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                      logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))
    assert all(1 <= len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)
    stream = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                       logprobs=2, stream=True)
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens.extend(chunk.choices[0].logprobs.tokens or [])
            offsets.extend(chunk.choices[0].logprobs.text_offset or [])
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(6):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0.8,  # type: ignore[arg-type]
                                               seed=seed, response_format={"type": "json_object"})
        choice = reply.choices[0]
        content = choice.message.content or ""
        assert content.startswith("{")
        if choice.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(content), dict), content
    assert finished >= 1, "no answer completed its JSON within 64 tokens"


@pytest.mark.parametrize("strict", [None, False])  # strict false is enforced too (OpenAI: best effort; vLLM: enforced)
def test_json_schema_output_matches_the_schema(client: openai.OpenAI, strict: bool | None) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer"}},
              "required": ["ok", "count"], "additionalProperties": False}
    for seed in range(3):
        reply = client.chat.completions.create(  # type: ignore[call-overload]
            model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                    "strict": strict}})
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            answer = json.loads(choice.message.content or "")
            assert set(answer) == {"ok", "count"}
            assert isinstance(answer["ok"], bool) and isinstance(answer["count"], int)


def test_json_schema_of_an_empty_schema_is_any_json_value(client: openai.OpenAI) -> None:
    """`schema: {}` allows any JSON value, as in vLLM (a missing schema is refused: test_server_bad_inputs)."""
    finished = 0
    for seed in range(4):
        reply = client.chat.completions.create(  # type: ignore[call-overload]
            model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "anything", "schema": {}}})
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            json.loads(choice.message.content or "")
    assert finished >= 1, "no answer completed its JSON within 16 tokens"


def test_developer_is_system_and_names_are_accepted(client: openai.OpenAI) -> None:
    assert template_message(ChatMessage(role="developer", content="Be brief."))["role"] == "system"
    assert template_message(ChatMessage(role="user", content="hi", name="bob")) == {
        "role": "user", "content": "hi", "name": "bob"}
    as_system = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    as_developer = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hello.",
                                                                    "name": "bob"}])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


@pytest.mark.parametrize("params, param", [
    ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"extra_body": {"best_of": 2}}, "best_of"),
    ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),
    # a field inside a parameter is refused by name too, not dropped
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"response_format": {"type": "json_object", "schema": {"type": "array"}}}, "response_format.schema"),
    ({"extra_body": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}},
     "messages[0].content[0].cache_control"),
    # false where the default is true asks for something: not "not sent"
    ({"extra_body": {"add_generation_prompt": False}}, "add_generation_prompt"),
    ({"extra_body": {"skip_special_tokens": False}}, "skip_special_tokens"),
])
def test_what_the_builtin_engine_cannot_honour_is_refused_by_name(client: openai.OpenAI, params: dict[str, object],
                                                                  param: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **params)  # type: ignore[call-overload]
    body = excinfo.value.body
    assert isinstance(body, dict)
    assert body["code"] == "unsupported_parameter" and body["param"] == param
    assert param in body["message"]


def test_null_is_not_sent(client: openai.OpenAI, llama_server: ServerThread) -> None:
    """`null` means "not sent" for every parameter: the default, never a 400 or another meaning."""
    eos = llama_server.app.state.services.engine.tokenizer.eos_token_id
    plain = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, stream=None,
                                      echo=None, max_tokens=None, logit_bias={str(eos): -100})
    assert plain.usage is not None and plain.usage.completion_tokens == 16  # completions' default, as OpenAI's
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=None)  # type: ignore[arg-type]
    assert chat.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": None}))  # type: ignore[typeddict-item]
    assert chunks and all(chunk.usage is None for chunk in chunks)


def test_logprobs_false_is_not_sent_on_chat_and_zero_on_completions(client: openai.OpenAI) -> None:
    """Chat's `logprobs` is a flag: false is its default. Completions' is a number: false reads as 0, as in vLLM
    (pydantic's and vLLM's int parsing alike), so the answer has each sampled token's log-probability."""
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=False)  # type: ignore[arg-type]
    assert chat.choices[0].logprobs is None
    params = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}
    as_false = client.completions.create(**params, logprobs=False)  # type: ignore[call-overload]
    as_zero = client.completions.create(**params, logprobs=0)  # type: ignore[call-overload]
    assert as_false.choices[0].logprobs is not None and as_false.choices[0].logprobs.tokens
    assert as_false.choices[0].logprobs == as_zero.choices[0].logprobs


def test_a_completion_without_max_tokens_gets_what_the_context_still_holds(client: openai.OpenAI,
                                                                          llama_server: ServerThread) -> None:
    """Not sent, `max_tokens` is 16 or what fits after the prompt; sent, it must fit (as OpenAI and vLLM)."""
    engine = llama_server.app.state.services.engine
    words = 1
    while len(engine.encode_text("fox " * (words + 1))) <= engine.max_model_len - 5:
        words += 1
    prompt = "fox " * words
    room = engine.max_model_len - len(engine.encode_text(prompt))
    assert 1 <= room <= 8
    eos = str(engine.tokenizer.eos_token_id)
    for max_tokens in (None, openai.NOT_GIVEN):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,  # type: ignore[arg-type]
                                          logit_bias={eos: -100})
        assert reply.usage is not None and reply.usage.completion_tokens == room
        assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=16)
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["code"] == "context_length_exceeded"


def test_a_prompt_of_token_ids_is_the_prompt_those_tokens_spell(client: openai.OpenAI,
                                                                  llama_server: ServerThread) -> None:
    engine = llama_server.app.state.services.engine
    ids = engine.encode_text("The quick brown fox")
    as_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    for prompt in (ids, [ids]):  # OpenAI's two forms of one prompt of tokens
        as_ids = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert [c.text for c in as_ids.choices] == [as_text.choices[0].text]
        assert as_ids.usage is not None and as_ids.usage.prompt_tokens == len(ids)


def test_several_prompts_get_a_choice_per_prompt_and_n_in_prompt_order(client: openai.OpenAI,
                                                                        llama_server: ServerThread) -> None:
    engine = llama_server.app.state.services.engine
    prompts = ["The quick brown fox", "Hello", "A"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    assert len(set(alone)) > 1, "the tiny model was expected to answer different prompts differently"
    tokens = sum(len(engine.encode_text(p)) for p in prompts)
    for form in (prompts, [engine.encode_text(p) for p in prompts]):
        reply = client.completions.create(model=MODEL, prompt=form, n=2, max_tokens=6, temperature=0)
        assert [c.index for c in reply.choices] == list(range(6))
        assert [c.text for c in reply.choices] == [text for text in alone for _ in range(2)]  # choice i*n+j: prompt i
        assert reply.usage is not None and reply.usage.prompt_tokens == tokens
    streamed: dict[int, str] = {}
    finished: set[int] = set()
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finished.add(choice.index)
    assert streamed == dict(enumerate(alone)) and finished == {0, 1, 2}


def test_stream_options_need_stream(client: openai.OpenAI) -> None:
    for stream in (openai.NOT_GIVEN, False):
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=stream,  # type: ignore[call-overload]
                                           stream_options={"include_usage": True})
        assert isinstance(excinfo.value.body, dict) and excinfo.value.body["param"] == "stream_options"
        assert "stream" in excinfo.value.body["message"]


def test_false_that_is_not_the_default_is_refused_on_completions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"add_special_tokens": False})
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["param"] == "add_special_tokens"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                     extra_body={"ignore_eos": False}).choices  # false is ignore_eos's default


def test_errors_name_the_parameter_the_client_sent(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=2)  # type: ignore[arg-type]
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["param"] == "top_logprobs"
    # as vLLM: zero alternatives need no `logprobs`, and none are given
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=100_000)  # type: ignore[arg-type]
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["param"] == "max_completion_tokens"
    assert "max_completion_tokens" in excinfo.value.body["message"]


def test_completion_top_logprobs_include_the_sampled_token(client: openai.OpenAI) -> None:
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements"; so with `logprobs: 0` too, and for a sampled token outside the most likely ones."""
    for logprobs in (0, 1):
        for stream in (False, True):
            reply = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8,
                                              temperature=2.0, seed=7, logprobs=logprobs, stream=stream)
            choices = [chunk.choices[0] for chunk in reply] if stream else [reply.choices[0]]  # type: ignore[union-attr]
            tokens, token_logprobs, tops = [], [], []
            for choice in choices:
                if choice.logprobs is not None:
                    tokens += choice.logprobs.tokens or []
                    token_logprobs += choice.logprobs.token_logprobs or []
                    tops += choice.logprobs.top_logprobs or []
            assert tokens and len(tops) == len(tokens)
            for token, logprob, top in zip(tokens, token_logprobs, tops, strict=True):
                assert top[token] == logprob and 1 <= len(top) <= logprobs + 1


def test_text_parts_are_joined_as_lines() -> None:
    """Several text parts make one message, joined with newlines as vLLM joins them."""
    parts = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]})
    assert template_message(parts)["content"] == "a\nb"


def test_tool_messages_are_refused_by_name(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[  # type: ignore[misc, list-item]
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["param"] == "messages[1].tool_calls"


def test_finish_reasons_are_openais() -> None:
    assert set(OPENAI_FINISH_REASONS.values()) <= {"stop", "length", "content_filter", "tool_calls"}
    assert OPENAI_FINISH_REASONS["cancelled"] == "length"


def test_the_vllm_gateway_relays_tools_and_tool_messages(auth_dir: Path, token_factory: Callable[..., str]) -> None:
    import test_server_relay as relay_tests

    standin = relay_tests.StandInEngine()
    engine_server = ServerThread(standin.app)
    engine_server.thread.start()
    gateway = None
    try:
        settings = ServerSettings(engine="vllm", engine_url=engine_server.url, model_name=relay_tests.MODEL,
                                  auth_dir=auth_dir)
        gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token_factory(), max_retries=0)
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        messages = [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "hi", "name": "bob"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
        client.chat.completions.create(model=relay_tests.MODEL, messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                       tools=tools, tool_choice="auto")  # type: ignore[arg-type]
        sent = standin.requests[-1]
        assert sent["tools"] == tools and sent["tool_choice"] == "auto"
        assert sent["messages"] == messages  # relayed as sent: roles, names and tool fields unchanged
    finally:
        if gateway is not None:
            gateway.stop()
        engine_server.stop()


def test_a_completion_without_max_tokens_on_a_server_capped_below_16_gets_the_cap(
        tiny_models: dict[str, Path], auth_dir: Path, token_factory: Callable[..., str]) -> None:
    """OpenAI's default of 16 completion tokens is cut to the server's `--max-new-tokens` (it was refused with 400
    "max_tokens is too large: 16", a parameter the client never sent)."""
    from devcluster.testing.model_server import tiny_settings

    server = ServerThread(create_app(tiny_settings(tiny_models["llama"], auth_dir=auth_dir,
                                                   max_new_tokens=4))).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token_factory(), max_retries=0)
        reply = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0)
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError, match="max_tokens is too large: 5"):
            client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5)
    finally:
        server.stop()
