"""The in-cluster auth source against a real API server: the server watches the operator's ConfigMap, so a key
revoked there (or a new signing key published) takes effect with no restart (the time it took is printed)."""

from __future__ import annotations

import base64
import gzip
import json
import time

import httpx
import pytest
from kubernetes import client

from devcluster.testing.model_server import AUDIENCE, ISSUER, SigningKey, mint, server_process

pytestmark = pytest.mark.cluster


def auth_configmap(name: str, keys: list[SigningKey], revoked: dict[str, int], gzip_revoked: bool = False) -> dict:
    data = {
        "config.json": json.dumps({"issuer": ISSUER, "audience": AUDIENCE, "generation": 1,
                                   "defaultLimits": {"rps": 1000, "burst": 1000, "tpm": None, "parallel": None}}),
        "jwks.json": json.dumps({"keys": [k.jwk() for k in keys]}),
        "limits.json": "{}",
    }
    body: dict = {"metadata": {"name": name}, "data": data, "binaryData": {}}
    if gzip_revoked:
        body["binaryData"]["revoked.json.gz"] = base64.b64encode(gzip.compress(json.dumps(revoked).encode())).decode()
    else:
        data["revoked.json"] = json.dumps(revoked)
    return body


def wait_status(url: str, token: str, expected: int, timeout: float) -> float:
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code
        if last == expected:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"status stayed {last}, expected {expected} within {timeout}s")


def test_configmap_watch_applies_revocation_and_new_keys(cluster, api_client, namespace, tiny_models, tmp_path):
    core = client.CoreV1Api(api_client)
    old_key, new_key = SigningKey(kid="k-old"), SigningKey(kid="k-new")
    token = mint(old_key, jti="jti-alice-1")
    core.create_namespaced_config_map(namespace, auth_configmap("chat-auth", [old_key], {}))
    args = ["--model", str(tiny_models["llama"]), "--model-name", "deepseek-tiny", "--precision", "fp32",
            "--device", "cpu", "--auth-configmap", f"{namespace}/chat-auth"]
    with server_process(args, env={"KUBECONFIG": str(cluster.kubeconfig)}, log_dir=tmp_path) as (url, _):
        wait_status(url, token, 200, 60)
        newer = mint(new_key)
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {newer}"}).status_code == 401

        # Publish the new signing key (the operator publishes before it signs): accepted within seconds.
        core.replace_namespaced_config_map("chat-auth", namespace,
                                           auth_configmap("chat-auth", [old_key, new_key], {}))
        took = wait_status(url, newer, 200, 60)
        print(f"new signing key accepted {took:.2f}s after the ConfigMap changed")

        # Revoke the first token, in the compressed form the operator uses for large lists.
        core.replace_namespaced_config_map("chat-auth", namespace, auth_configmap(
            "chat-auth", [old_key, new_key], {"jti-alice-1": int(time.time()) + 3600}, gzip_revoked=True))
        took = wait_status(url, token, 401, 60)
        print(f"revocation applied {took:.2f}s after the ConfigMap changed")
        body = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}).json()
        assert body["error"]["code"] == "invalid_api_key" and token not in json.dumps(body)
        assert body["error"]["message"] == "Incorrect API key provided: The API key has been revoked."
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {newer}"}).status_code == 200
