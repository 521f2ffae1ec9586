"""The official openai client against a live server on a tiny Llama: the API a user sees."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster.testing.model_server import ServerThread

MODEL = "deepseek-tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(llama_server: ServerThread, token_factory: Callable[..., str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token_factory(), max_retries=0)


def test_chat_completion_answers_with_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 8


def test_greedy_is_deterministic_and_cached(client: openai.OpenAI) -> None:
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                            temperature=0, user="cache-test")
    second = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                             temperature=0, user="cache-test")
    assert first.headers["x-cache"] in ("miss", "hit")
    assert second.headers["x-cache"] == "hit"
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert first.parse().id != second.parse().id
    sampled = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                              temperature=1.0)
    assert sampled.headers["x-cache"] == "miss"


def test_seeded_sampling_repeats(llama_server: ServerThread, token_factory: Callable[..., str]) -> None:
    # Each answer comes from a different ApiKey (uid): the response cache is per key, so all three are generated.
    def sample(seed: int) -> tuple[str, str]:
        api = openai.OpenAI(base_url=f"{llama_server.url}/v1", max_retries=0,
                            api_key=token_factory(uid=f"uid-seed-{uuid.uuid4().hex[:8]}"))
        raw = api.completions.with_raw_response.create(model=MODEL, prompt="Tell me a story", max_tokens=16,
                                                       temperature=1.0, seed=seed)
        return raw.headers["x-cache"], raw.parse().choices[0].text

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert (first[0], again[0], other[0]) == ("miss", "miss", "miss")
    assert first[1] == again[1], "the same seed sampled two different answers"
    assert first[1] != other[1], "another seed sampled the same answer"


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True,
                                                 seed=7, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == greedy.choices[0].message.content
    # the seeded stream carries the same text as the same request answered in one piece
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, seed=7)
    assert content and content == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == finishes[0]


def test_streaming_ends_with_done(llama_server: ServerThread, token_factory: Callable[..., str]) -> None:
    with httpx.stream("POST", f"{llama_server.url}/v1/completions", timeout=30,
                      headers={"authorization": f"Bearer {token_factory()}"},
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert '"choices":[]' in events[-2] and '"usage":{' in events[-2]


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    # a random-weight model may end its greedy answer at once for some prompts: use the first that runs long enough
    for prompt in ("Hello world", "Once upon a time", "The quick brown fox", "1 2 3 4", "Dear friend,"):
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
        # a stop string from the middle of the greedy answer: the same request must end right before it
        candidates = [text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in
                      text[i:i + 2]]
        if candidates:
            break
    assert candidates, f"no prompt gave a greedy output long enough to test stop; last: {text!r}"
    stop = candidates[0]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert stop not in cut.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_n_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens <= 18
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=50)
    assert excinfo.value.body["param"] == "n"  # type: ignore[index]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_model_named_like_its_hugging_face_repository_is_retrieved(auth_dir, token_factory) -> None:
    """Deployments serve names such as `deepseek-ai/deepseek-llm-7b-chat`: the openai client sends the id in the URL
    as it is, slash included."""
    from deepseek_server.app import create_app
    from deepseek_server.engine.noop import NoopEngine
    from deepseek_server.settings import ServerSettings

    name = "deepseek-ai/deepseek-llm-7b-chat"
    settings = ServerSettings(model_name=name, auth_dir=auth_dir)
    server = ServerThread(create_app(settings, engine=NoopEngine(model_name=name))).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token_factory(), max_retries=0)
        assert [m.id for m in client.models.list().data] == [name]
        assert client.models.retrieve(name).id == name
        escaped = httpx.get(f"{server.url}/v1/models/deepseek-ai%2Fdeepseek-llm-7b-chat",
                            headers={"Authorization": f"Bearer {token_factory()}"})
        assert escaped.status_code == 200 and escaped.json()["id"] == name
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("deepseek-ai/deepseek-llm-67b-chat")
        assert missing.value.code == "model_not_found"
    finally:
        server.stop()


def test_errors_are_the_clients_own_exceptions(llama_server: ServerThread, token_factory: Callable[..., str],
                                               client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    assert bad.value.param == "temperature"
    anonymous = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        anonymous.models.list()
    assert unauthenticated.value.code == "invalid_api_key"
    history_only = openai.OpenAI(base_url=f"{llama_server.url}/v1", max_retries=0,
                                 api_key=token_factory(scope=["history:read"]))
    with pytest.raises(openai.PermissionDeniedError):
        history_only.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_history_returns_only_the_callers_calls(llama_server: ServerThread, token_factory: Callable[..., str]) -> None:
    mine, other = token_factory(uid="uid-history-a"), token_factory(uid="uid-history-b")
    for token in (mine, mine, other):
        openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token, max_retries=0).completions.create(
            model=MODEL, prompt="history", max_tokens=2)
    response = httpx.get(f"{llama_server.url}/v1/history", headers={"authorization": f"Bearer {mine}"})
    assert response.status_code == 200
    records = response.json()["data"]
    assert len(records) == 2
    assert {r["key_uid"] for r in records} == {"uid-history-a"}
    assert all(r["route"] == "/v1/completions" and r["status"] == 200 for r in records)
    no_scope = token_factory(uid="uid-history-a", scope=["model:predict"])
    denied = httpx.get(f"{llama_server.url}/v1/history", headers={"authorization": f"Bearer {no_scope}"})
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "insufficient_scope"


def metric_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The server's /metrics as {(sample name, labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_probes_and_metrics(llama_server: ServerThread, token_factory: Callable[..., str]) -> None:
    assert httpx.get(f"{llama_server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{llama_server.url}/ready")
    assert ready.status_code == 200 and ready.json()["model"] is True
    api = openai.OpenAI(base_url=f"{llama_server.url}/v1", max_retries=0,
                        api_key=token_factory(uid=f"uid-metrics-{uuid.uuid4().hex[:8]}"))
    messages = [{"role": "user", "content": f"metrics {uuid.uuid4().hex}"}]  # never asked before: not cached
    before = metric_samples(llama_server.url)
    generated = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    cached = api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6,
                                                           temperature=0)
    assert cached.headers["x-cache"] == "hit"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o", messages=messages)
    after = metric_samples(llama_server.url)

    chat = "/v1/chat/completions"
    assert generated.usage is not None
    assert delta(before, after, "deepseek_api_requests_total", route=chat, status="200") == 2
    assert delta(before, after, "deepseek_api_requests_total", route=chat, status="404") == 1
    assert delta(before, after, "deepseek_api_errors_total", route=chat, status="404") == 1
    assert delta(before, after, "deepseek_api_errors_total", route=chat, status="200") == 0
    assert delta(before, after, "deepseek_api_request_duration_seconds_count", route=chat) == 3
    # observed once per generated answer with text (labelled by kind); a cache hit generates nothing
    first_text = 1 if generated.choices[0].message.content else 0
    assert delta(before, after, "deepseek_time_to_first_token_seconds_count", route="chat") == first_text
    assert delta(before, after, "deepseek_generated_tokens_total") == generated.usage.completion_tokens
    assert delta(before, after, "deepseek_prompt_tokens_total") == generated.usage.prompt_tokens
    assert delta(before, after, "deepseek_cache_hits_total") == 1
    assert delta(before, after, "deepseek_cache_misses_total") == 1
    assert delta(before, after, "deepseek_batch_size_count") >= 1  # one observation per decode step
    assert after[("deepseek_queue_depth", frozenset())] == 0
