"""A deployment whose auth documents span several shard ConfigMaps, against a real API server: the server started
with `--auth-configmap NS/chat-auth` reads the index and every shard it lists, rejects a token revoked in any shard,
honours limits kept in a shard, and applies a new revocation written to its one shard within seconds."""

from __future__ import annotations

import base64
import json
import random
import time

import httpx
import pytest
from deepseek_operator.auth_config import (
    SHARD_COUNT,
    AuthDocuments,
    RevokeTokens,
    apply_changes,
    build_layout,
    shard_of,
)
from kubernetes import client

from devcluster.testing.model_server import AUDIENCE, ISSUER, SigningKey, mint, server_process

pytestmark = pytest.mark.cluster


def put(core: client.CoreV1Api, namespace: str, name: str, content) -> None:
    data, binary = content
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data, binary_data=binary or None)
    try:
        current = core.read_namespaced_config_map(name, namespace)
    except client.ApiException as exc:
        assert exc.status == 404
        core.create_namespaced_config_map(namespace, body)
        return
    body.metadata.resource_version = current.metadata.resource_version
    core.replace_namespaced_config_map(name, namespace, body)


def status(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def wait_status(url: str, token: str, expected: int, timeout: float) -> float:
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = status(url, token).status_code
        if last == expected:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"status stayed {last}, expected {expected} within {timeout}s")


def test_server_reads_every_shard_and_refuses_a_token_revoked_in_any(cluster, api_client, namespace, tiny_models,
                                                                     tmp_path):
    core = client.CoreV1Api(api_client)
    key = SigningKey(kid="k1")
    rng = random.Random(3)
    now = int(time.time())
    # Tokens whose ids land in different shards: one revoked from the start, one revoked later, one kept.
    early_jti, late_jti, kept_jti = "jti-early-revoked", "jti-late-revoked", "jti-kept-2"
    assert len({shard_of(j, SHARD_COUNT) for j in (early_jti, late_jti, kept_jti)}) == 3
    revoked = {base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode(): now + 3600 for _ in range(3000)}
    limits = {f"uid-{i}": {"rps": 100, "burst": 100, "tpm": None, "parallel": None} for i in range(3000)}
    limits["uid-slow"] = {"rps": 0.01, "burst": 1, "tpm": None, "parallel": None}
    docs = AuthDocuments(
        config={"issuer": ISSUER, "audience": AUDIENCE, "generation": 1,
                "defaultLimits": {"rps": 1000, "burst": 1000, "tpm": None, "parallel": None}},
        jwks={"keys": [key.jwk()]}, revoked={**revoked, early_jti: now + 3600}, limits=limits)
    layout = build_layout(docs, SHARD_COUNT)
    names = layout.names("chat-auth")
    for name, content in list(zip(names, layout.contents, strict=True))[::-1]:  # shards first, index last
        put(core, namespace, name, content)

    early, late, kept = (mint(key, jti=j, uid="uid-7") for j in (early_jti, late_jti, kept_jti))
    slow = mint(key, uid="uid-slow")
    args = ["--model", str(tiny_models["llama"]), "--model-name", "deepseek-tiny", "--precision", "fp32",
            "--device", "cpu", "--auth-configmap", f"{namespace}/chat-auth"]
    with server_process(args, env={"KUBECONFIG": str(cluster.kubeconfig)}, log_dir=tmp_path) as (url, _):
        wait_status(url, kept, 200, 120)
        body = status(url, early).json()
        assert body["error"]["message"] == "Incorrect API key provided: The API key has been revoked."
        assert early not in json.dumps(body)
        assert status(url, late).status_code == 200
        # uid-slow's own limits live in one shard: a burst of 1, so the second request in a row is limited.
        codes = [httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {slow}"}, timeout=60,
                            json={"model": "deepseek-tiny", "prompt": "hi", "max_tokens": 1}).status_code
                 for _ in range(2)]
        assert codes == [200, 429], codes

        # The operator's way to revoke: the one shard that holds the token id is rewritten, nothing else.
        later = build_layout(apply_changes(docs, [RevokeTokens({late_jti: now + 3600})], now=now), SHARD_COUNT,
                             layout)
        changed = [i for i, (a, b) in enumerate(zip(layout.contents, later.contents, strict=True)) if a != b]
        assert changed == [shard_of(late_jti, SHARD_COUNT) + 1]
        put(core, namespace, names[changed[0]], later.contents[changed[0]])
        took = wait_status(url, late, 401, 60)
        print(f"revocation in shard {changed[0] - 1} applied {took:.2f}s after its ConfigMap changed")
        assert status(url, kept).status_code == 200 and status(url, early).status_code == 401
