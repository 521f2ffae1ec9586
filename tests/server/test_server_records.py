"""What the server records about requests: one audit record for every request whatever its status, prompt text
masked before it reaches the audit file or Redis, keyed request fingerprints, and a response cache that is scoped to
the caller's key, the deployment and the model revision."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from deepseek_server.app import create_app
from deepseek_server.engine.base import GenerationRequest, GenerationStream, TextDelta
from deepseek_server.engine.noop import NoopEngine
from deepseek_server.schemas import CompletionRequest
from deepseek_server.settings import ServerSettings
from prometheus_client.parser import text_string_to_metric_families

from devcluster.testing.model_server import ServerThread, SigningKey, mint, write_auth_dir

MODEL = "deepseek-tiny"
LIMITED = "uid-records-limited"  # one request, then 429 for a while
TOKENS = "uid-records-tokens"  # 10 tokens per minute
RECORD_KEY = "record-key-of-the-records-tests-0123456789"


class SwitchableEngine(NoopEngine):
    """The no-op engine, made to fail (`fail_next`) or to be not ready (`set_ready`) on the test's command."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL)
        self.fail_next = False

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the engine broke")
        return super().submit(request)

    def set_ready(self, ready: bool) -> None:
        self._ready = ready


def settings(auth: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {"model_name": MODEL, "auth_dir": str(auth), "max_body_bytes": 4096,
                              "record_key": RECORD_KEY}
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey(kid="records")


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Path:
    return write_auth_dir(tmp_path_factory.mktemp("records-auth"), [key], limits={
        LIMITED: {"rps": 0.01, "burst": 1, "tpm": None, "parallel": None},
        TOKENS: {"rps": 100, "burst": 100, "tpm": 10, "parallel": None},
    })


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for_records(path: Path, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
                     ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = read_audit(path)
        if done(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_every_request_has_one_audit_record_whatever_its_status(tmp_path: Path, auth: Path,
                                                                key: SigningKey) -> None:
    audit = tmp_path / "audit.jsonl"
    engine = SwitchableEngine()
    server = ServerThread(create_app(settings(auth, audit_log=audit), engine=engine)).start()
    url = f"{server.url}/v1/completions"

    def call(uid: str, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {mint(key, uid=uid)}"} if uid else {}
        payload = body if body is not None else {"model": MODEL, "prompt": "hello there", "max_tokens": 3}
        return httpx.post(url, json=payload, headers=headers, timeout=30, **kwargs)

    try:
        sent: list[tuple[str, int, httpx.Response]] = []
        sent.append(("uid-200", 200, call("uid-200")))
        sent.append(("uid-400", 400, call("uid-400", {"model": MODEL, "prompt": "x", "max_tokens": -1})))
        sent.append(("", 401, call("")))
        sent.append(("uid-404", 404, call("uid-404", {"model": "other", "prompt": "x"})))
        sent.append(("", 413, call("uid-413", {"model": MODEL, "prompt": "x" * 8000})))
        call(LIMITED)  # takes the only request of the bucket
        sent.append((LIMITED, 429, call(LIMITED)))
        sent.append((TOKENS, 200, call(TOKENS, {"model": MODEL, "prompt": "one two three four five six seven "
                                                "eight nine ten eleven", "max_tokens": 1})))
        sent.append((TOKENS, 429, call(TOKENS)))
        engine.fail_next = True
        sent.append(("uid-500", 500, call("uid-500")))
        engine.set_ready(False)
        sent.append(("uid-503", 503, call("uid-503")))
        engine.set_ready(True)
        streamed = {"model": MODEL, "prompt": "stream me", "max_tokens": 3, "stream": True}
        sent.append(("uid-stream", 200, call("uid-stream", streamed)))
        for uid, status, response in sent:
            assert response.status_code == status, (uid, response.text)
        unexpected = next(response for uid, _, response in sent if uid == "uid-500")
        assert unexpected.json() == {"error": {"message": "The server had an error while processing your request.",
                                               "type": "server_error", "param": None, "code": None}}
        assert unexpected.headers["x-ratelimit-limit-requests"]  # admitted before the engine failed, as on a 200

        expected = len(sent) + 1  # and the LIMITED call that emptied the bucket
        records = wait_for_records(audit, lambda r: len(r) >= expected)
        assert len(records) == expected, [(r["status"], r["key_uid"]) for r in records]
        assert sorted(r["status"] for r in records) == sorted([200] + [status for _, status, _ in sent])
        by_id = {r["request_id"]: r for r in records}
        assert len(by_id) == expected  # one record per request, none twice
        for uid, status, response in sent:
            # the id that finds the request's record, on every answer: the engine's unhandled exception's 500 too
            record = by_id[response.headers["x-request-id"]]
            assert record["status"] == status and record["path"] == "/v1/completions"
            if uid:
                assert record["key_uid"] == uid
        codes = {r["status"]: r["error_code"] for r in records if r["status"] >= 413}
        assert codes == {413: "request_too_large", 429: "rate_limit_exceeded", 500: "internal_error",
                         503: "model_not_ready"}
        assert {r["error_code"] for r in records if r["status"] == 429} == {"rate_limit_exceeded"}
        limited = [r for r in records if r["key_uid"] == TOKENS and r["status"] == 429]
        assert limited and limited[0]["model"] == MODEL
    finally:
        server.stop()


def test_a_failing_engine_does_not_keep_the_callers_parallel_slot(tmp_path: Path, key: SigningKey) -> None:
    auth_dir = write_auth_dir(tmp_path / "auth", [key], default_limits={"rps": 100, "burst": 100, "tpm": None,
                                                                         "parallel": 1})
    engine = SwitchableEngine()
    server = ServerThread(create_app(settings(auth_dir, audit_log=tmp_path / "audit.jsonl"), engine=engine)).start()
    headers = {"authorization": f"Bearer {mint(key, uid='uid-one-at-a-time')}"}
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    try:
        engine.fail_next = True
        failed = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert failed.status_code == 500
        after = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert after.status_code == 200, after.text  # not 429 "parallel requests": the slot was freed
    finally:
        server.stop()


class FailingMidway(NoopEngine):
    """Sends one word of its reply, then fails as a broken model does while generating."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(request, lambda s: None)
        stream.queue.put_nowait(TextDelta("ok ", 1))
        stream.queue.put_nowait(RuntimeError("the model broke midway"))
        return stream


def api_counts(server: ServerThread) -> dict[tuple[str, str, str], float]:
    """(family, route, status) -> value of `deepseek_api_requests` and `deepseek_api_errors` from /metrics."""
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return {(family.name, sample.labels["route"], sample.labels["status"]): sample.value for family in families
            if family.name in ("deepseek_api_requests", "deepseek_api_errors") for sample in family.samples
            if sample.labels["route"] != "/metrics"}


def test_a_stream_that_fails_after_its_200_is_counted_as_the_server_error_it_is(tmp_path: Path, auth: Path,
                                                                                  key: SigningKey) -> None:
    """The post-switch analysis and the error-rate alert count 5xx in `deepseek_api_requests_total`; a stream whose
    model fails midway was counted as a 200 (its status line went out first), so a revision that broke every
    streamed request was seen as healthy. It is counted under the 500 the same failure gets unstreamed; its audit
    record keeps the 200 that was sent, with the error's code."""
    audit = tmp_path / "audit.jsonl"
    server = ServerThread(create_app(settings(auth, audit_log=audit, no_cache=True), engine=FailingMidway())).start()
    headers = {"authorization": f"Bearer {mint(key, uid='uid-failing-midway')}"}
    route = "/v1/chat/completions"
    try:
        before = api_counts(server)
        response = httpx.post(f"{server.url}{route}", headers=headers, timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True})
        assert response.status_code == 200
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "ok "
        # the error event, then [DONE] as vLLM ends a stream that failed
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        unstreamed = httpx.post(f"{server.url}{route}", headers=headers, timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert unstreamed.status_code == 500
        after = api_counts(server)
        added = {labels: value - before.get(labels, 0) for labels, value in after.items()
                 if value != before.get(labels, 0)}
        assert added == {("deepseek_api_requests", route, "500"): 2, ("deepseek_api_errors", route, "500"): 2}
        [record] = [r for r in wait_for_records(audit, lambda r: len(r) >= 2)
                    if r["request_id"] == response.headers["x-request-id"]]
        assert (record["status"], record["error_code"], record["stream"]) == (200, "generation_failed", True)
    finally:
        server.stop()


SECRETS = {  # in this order, every category's mask falls inside the 200-character preview
    "phone": "+1 415 555 0132",
    "ssn": "123-45-6789",
    "card": "4111 1111 1111 1111",
    "email": "jane.roe@example.org",
    "openai": "sk-proj-Zx81YqP0aLm3NcVb7TtR",
    "bearer": "Bearer opaque-token-0f9e8d7c6b5a",
    "jwt": "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsInVpZCI6InUxIn0.c2lnbmF0dXJlLWJ5dGVz",
}


def secret_fragments() -> list[str]:
    fragments = list(SECRETS.values())
    fragments += ["opaque-token-0f9e8d7c6b5a", "4111111111111111", "1111 1111 1111", "415 555 0132", "jane.roe",
                  SECRETS["jwt"].split(".")[1], "Zx81YqP0aLm3NcVb7TtR"]
    return fragments


def test_prompt_secrets_are_masked_before_the_audit_file_and_redis_history(tmp_path: Path, auth: Path,
                                                                          key: SigningKey, redis_url: str) -> None:
    audit = tmp_path / "audit.jsonl"
    app = create_app(settings(auth, audit_log=audit, audit_prompts=True, redis_url=redis_url, no_cache=True),
                     engine=SwitchableEngine())
    server = ServerThread(app).start()
    uid = f"uid-masking-{time.monotonic_ns()}"
    headers = {"authorization": f"Bearer {mint(key, uid=uid)}"}
    text = " ".join(f"my {name} is {value}," for name, value in SECRETS.items())
    # a card number and an e-mail address that cross the preview's 200-character cut
    crossing = "z" * 190 + " 4111-1111-1111-1111 and jane.roe@example.org"
    try:
        for prompt in (text, crossing):
            assert httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                              json={"model": MODEL, "prompt": prompt, "max_tokens": 2}).status_code == 200
        chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
        assert httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                          json=chat).status_code == 200
        history = httpx.get(f"{server.url}/v1/history", headers=headers, timeout=30).json()["data"]
        assert len(history) == 3
        def completions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [r for r in records if r["key_uid"] == uid and r["path"] != "/v1/history"]

        records = wait_for_records(audit, lambda r: len(completions(r)) == 3)
        previews = [r["prompt_preview"] for r in completions(records)]
        assert len(previews) == 3
        assert "[redacted:" in previews[0] and "[redacted:" in previews[2], previews
        for category in ("email", "api_key", "card", "national_id", "phone"):
            assert f"[redacted:{category}]" in previews[0] + previews[2], category
        assert previews[1] == "z" * 190  # what crossed the cut went whole, masked or not
        on_disk = audit.read_text()
        client = redis.Redis.from_url(redis_url)
        in_redis = []
        for name in client.scan_iter(count=1000):
            kind = client.type(name)
            if kind == b"list":
                in_redis += client.lrange(name, 0, -1)
            elif kind == b"string":
                in_redis.append(client.get(name))
        stored = b"\n".join(v for v in in_redis if v).decode(errors="replace")
        assert uid in stored and "[redacted:" in stored  # the history is there, masked
        for fragment in secret_fragments():
            assert fragment not in on_disk, fragment
            assert fragment not in stored, fragment
    finally:
        server.stop()


def test_fingerprints_are_keyed_hmacs_not_plain_hashes(tmp_path: Path, auth: Path, key: SigningKey) -> None:
    body = {"model": MODEL, "prompt": "yes", "max_tokens": 1}
    # what anyone could compute from a guessed prompt: a plain hash of the request as the server canonicalizes it
    canonical = {"route": "text", "body": CompletionRequest(**body).model_dump(exclude_none=True)}
    plain = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    fingerprints = []
    for record_key in (RECORD_KEY, RECORD_KEY, "another-record-key-of-another-deployment-xyz"):
        audit = tmp_path / f"audit-{len(fingerprints)}.jsonl"
        server = ServerThread(create_app(settings(auth, audit_log=audit, record_key=record_key, no_cache=True),
                                         engine=SwitchableEngine())).start()
        try:
            headers = {"authorization": f"Bearer {mint(key, uid='uid-fingerprint')}"}
            for _ in range(2):
                assert httpx.post(f"{server.url}/v1/completions", json=body, headers=headers,
                                  timeout=30).status_code == 200
            records = wait_for_records(audit, lambda r: len(r) >= 2)
        finally:
            server.stop()
        assert records[0]["fingerprint"] == records[1]["fingerprint"]  # same request, same fingerprint
        fingerprints.append(records[0]["fingerprint"])
    assert fingerprints[0] == fingerprints[1]  # the same key on another replica agrees
    assert fingerprints[0] != fingerprints[2]  # another key (deployment) does not
    assert plain not in fingerprints and len(fingerprints[0]) == 64


@pytest.fixture
def shared_redis(redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter("deepseek:cache:*"):
        client.delete(name)
    yield redis_url
    client.close()


def test_cache_answers_only_the_same_key_deployment_revision_and_environment(
        auth: Path, key: SigningKey, shared_redis: str) -> None:
    """Servers sharing one Redis and one record key: a replica of the same deployment and revision shares the
    cache; another revision, another deployment, another key or another environment never gets a hit."""
    def server(deployment: str, revision: str) -> ServerThread:
        return ServerThread(create_app(settings(auth, deployment=deployment, model_revision=revision,
                                                redis_url=shared_redis), engine=SwitchableEngine())).start()

    servers = {"a": server("team/chat", "rev1"), "a-replica": server("team/chat", "rev1"),
               "new-revision": server("team/chat", "rev2"), "other-deployment": server("team/other", "rev1")}
    body = {"model": MODEL, "prompt": "cache me", "max_tokens": 3, "temperature": 0}

    def x_cache(name: str, uid: str, env: str = "dev") -> str:
        response = httpx.post(f"{servers[name].url}/v1/completions", json=body, timeout=30,
                              headers={"authorization": f"Bearer {mint(key, uid=uid, env=env)}"})
        assert response.status_code == 200, response.text
        return response.headers["x-cache"]

    try:
        assert x_cache("a", "uid-writer") == "miss"
        assert x_cache("a", "uid-writer") == "hit"
        assert x_cache("a-replica", "uid-writer") == "hit"  # through Redis
        assert x_cache("a", "uid-someone-else") == "miss"  # no oracle across keys
        assert x_cache("a", "uid-writer", env="prod") == "miss"
        assert x_cache("new-revision", "uid-writer") == "miss"  # a rollout never serves the old answers
        assert x_cache("other-deployment", "uid-writer") == "miss"
        names = [n.decode() for n in redis.Redis.from_url(shared_redis).scan_iter("deepseek:cache:*")]
        assert len(names) == 5  # writer@rev1, someone else, prod, rev2, other deployment
        assert all(len(n.rsplit(":", 1)[1]) == 64 and "uid-" not in n for n in names)
    finally:
        for each in servers.values():
            each.stop()


def test_limits_in_memory_and_the_audit_take_no_shielded_cancel_scope(tmp_path: Path, auth: Path, key: SigningKey,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Shielding is for Redis releases that must finish; in memory there is nothing to wait for (and it costs)."""
    import sys

    import anyio

    real = anyio.CancelScope
    shielded: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if kwargs.get("shield") and caller.startswith("deepseek_server"):
            shielded.append(caller)
        return real(*args, **kwargs)

    monkeypatch.setattr(anyio, "CancelScope", counting)
    audit = tmp_path / "audit.jsonl"
    server = ServerThread(create_app(settings(auth, audit_log=audit, no_cache=True), engine=SwitchableEngine())).start()
    headers = {"authorization": f"Bearer {mint(key, uid='uid-unshielded')}"}
    try:
        for stream in (False, True):
            response = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                                  json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": stream})
            assert response.status_code == 200
        assert len(wait_for_records(audit, lambda r: len(r) >= 2)) == 2
    finally:
        server.stop()
    assert shielded == []
