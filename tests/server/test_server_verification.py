"""The operator's verification requests against a real deepseek-server: every second one is streamed, a working
server passes both kinds, and a stream that fails after its 200 fails verification with the error it carried."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepseek_operator.autoscaler import Load, LoadReader
from deepseek_operator.key_material import new_signing_key
from deepseek_operator.verification import AnalysisSettings, Endpoint, Verifier
from deepseek_server.app import create_app
from deepseek_server.engine.base import GenerationRequest, GenerationStream, TextDelta
from deepseek_server.engine.noop import NoopEngine
from deepseek_server.settings import ServerSettings

from devcluster.testing.model_server import ServerThread

MODEL = "deepseek-tiny"
NAMESPACE, DEPLOYMENT = "team", "chat"


class AnswersThenFailsMidway(NoopEngine):
    """Answers its first `answered` requests, then sends a word of each later one and fails while generating."""

    def __init__(self, answered: int) -> None:
        super().__init__(model_name=MODEL)
        self.answered = answered

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self.answered > 0:
            self.answered -= 1
            return super().submit(request)
        stream = GenerationStream(request, lambda s: None)
        stream.queue.put_nowait(TextDelta("ok ", 1))
        stream.queue.put_nowait(RuntimeError("the model broke midway"))
        return stream


def verify(tmp_path: Path, engine: NoopEngine, requests: int, host: str = "127.0.0.1") -> dict[str, Any]:
    key = new_signing_key(0)
    auth = tmp_path / "auth"
    auth.mkdir()
    for name, document in (("config.json", {"issuer": f"deepseek-operator/{NAMESPACE}/{DEPLOYMENT}",
                                            "audience": f"{NAMESPACE}/{DEPLOYMENT}", "generation": 1,
                                            "defaultLimits": {"rps": 1000, "burst": 1000, "tpm": None,
                                                              "parallel": None}}),
                           ("jwks.json", {"keys": [key.jwk()]}), ("revoked.json", {}), ("limits.json", {})):
        (auth / name).write_text(json.dumps(document))
    server = ServerThread(create_app(ServerSettings(model_name=MODEL, auth_dir=auth, no_cache=True),
                                     engine=engine), host=host).start()
    verifier = Verifier(port=server.port)
    try:
        result = verifier.verify([Endpoint("pod-a", host)], signing_key=key, namespace=NAMESPACE,
                                 deployment=DEPLOYMENT, deployment_uid="uid-chat", model=MODEL,
                                 settings=AnalysisSettings(requests=requests, max_error_rate=0.0))
        # the post-switch analysis' reading of the same pod, and the autoscaler's
        result["live_counts"] = verifier.live_counts([host])
        reader = LoadReader(port=server.port)
        try:
            result["load"] = reader.read([host], "deepseek_requests_in_flight")
        finally:
            reader.close()
        return result
    finally:
        verifier.close()
        server.stop()


def test_a_working_server_passes_streamed_and_unstreamed_verification(tmp_path: Path) -> None:
    result = verify(tmp_path, NoopEngine(model_name=MODEL), requests=4)
    assert result["passed"] and (result["requests"], result["errors"]) == (4, 0), result["message"]


def test_pods_with_ipv6_addresses_are_verified_and_read(tmp_path: Path) -> None:
    """An IPv6 (or IPv6-first) cluster gives pods IPv6 addresses: the URLs the operator builds for them put the
    address in brackets (written bare, `http://fd00::1:8000/...` is not a URL, and every check of such a pod
    raised before it was sent)."""
    result = verify(tmp_path, NoopEngine(model_name=MODEL), requests=2, host="::1")
    assert result["passed"] and (result["requests"], result["errors"]) == (2, 0), result["message"]
    assert result["live_counts"] == (2, 0)
    assert result["load"] == Load(total=0.0, pods=1, ready=1)


def test_a_stream_that_fails_after_its_200_fails_verification_with_its_error(tmp_path: Path) -> None:
    # the first request (unstreamed) is answered; the second, streamed, fails after its 200
    result = verify(tmp_path, AnswersThenFailsMidway(answered=1), requests=2)
    assert not result["passed"] and (result["requests"], result["errors"]) == (2, 1)
    assert ("pod-a: error event after HTTP 200: The model failed while generating: the model broke midway"
            in result["message"]), result["message"]
