"""The ConfigMap auth source's GET-then-watch loop, driven through the real kubernetes `Watch` with a fake API."""

from __future__ import annotations

import base64
import json
import queue
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deepseek_server.auth.configmap_source import ConfigMapAuthSource
from deepseek_server.auth.documents import AuthState
from fake_watch import FakeResponse
from kubernetes.client import V1ConfigMap, V1ObjectMeta

RAW = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
X = base64.urlsafe_b64encode(RAW).rstrip(b"=").decode()


def configmap_data(generation: int, revoked: dict[str, int]) -> dict[str, str]:
    return {
        "config.json": json.dumps({"issuer": "i", "audience": "a", "generation": generation,
                                   "defaultLimits": {"rps": 1, "burst": 1, "tpm": None, "parallel": None}}),
        "jwks.json": json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": X, "kid": "k", "use": "sig",
                                           "alg": "EdDSA"}]}),
        "revoked.json": json.dumps(revoked),
    }




class FakeCoreV1:
    """GET returns `current`; each watch request streams the events put on `events`."""

    def __init__(self) -> None:
        self.current = V1ConfigMap(metadata=V1ObjectMeta(name="chat-auth", namespace="ns", resource_version="1"),
                                   data=configmap_data(1, {}))
        self.events: queue.Queue[bytes | None] = queue.Queue()
        self.gets = 0
        self.watch_calls: list[dict[str, Any]] = []

    def read_namespaced_config_map(self, name: str, namespace: str) -> V1ConfigMap:
        assert (name, namespace) == ("chat-auth", "ns")
        self.gets += 1
        return self.current

    def list_namespaced_config_map(self, namespace: str, **kwargs: Any) -> FakeResponse:
        """A watch request.

        :return: V1ConfigMapList
        """
        self.watch_calls.append(kwargs)
        return FakeResponse(self.events)

    def push(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.put((json.dumps({"type": kind, "object": obj}) + "\n").encode())


def wait_for(predicate: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_get_then_watch_then_recover_from_gone() -> None:
    core = FakeCoreV1()
    states: list[AuthState] = []
    source = ConfigMapAuthSource("ns/chat-auth", states.append, core_api_factory=lambda: core, retry_delay_s=0.05)
    source.start()
    try:
        assert wait_for(lambda: len(states) == 1)
        assert states[0].generation == 1
        assert wait_for(lambda: core.watch_calls)
        call = core.watch_calls[0]
        assert call["field_selector"] == "metadata.name=chat-auth"  # only its own ConfigMap: get+watch RBAC
        assert call["resource_version"] == "1" and call["watch"] is True

        core.push("MODIFIED", {"metadata": {"name": "chat-auth", "resourceVersion": "2"},
                               "data": configmap_data(2, {"jti-1": 99})})
        assert wait_for(lambda: len(states) == 2)
        assert states[1].revoked == {"jti-1": 99}

        core.push("MODIFIED", {"metadata": {"name": "chat-auth", "resourceVersion": "3"},
                               "data": {"config.json": "{broken"}})
        core.push("DELETED", {"metadata": {"name": "chat-auth", "resourceVersion": "4"}})
        # events are handled in order: once the next good one applies, the two before it were seen and skipped
        core.push("MODIFIED", {"metadata": {"name": "chat-auth", "resourceVersion": "5"},
                               "data": configmap_data(5, {"jti-1": 99, "jti-2": 77})})
        assert wait_for(lambda: len(states) == 3)
        assert states[2].generation == 5 and states[2].revoked == {"jti-1": 99, "jti-2": 77}

        # history compacted: the source starts over with a fresh GET
        core.current = V1ConfigMap(metadata=V1ObjectMeta(name="chat-auth", resource_version="9"),
                                   data=configmap_data(9, {}))
        core.push("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})
        assert wait_for(lambda: len(states) == 4)
        assert states[3].generation == 9 and core.gets >= 2
    finally:
        source._stop.set()
        core.events.put(None)  # end the open watch so the thread sees the stop
        source.stop()
