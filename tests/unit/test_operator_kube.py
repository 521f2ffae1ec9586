import os

import pytest
from deepseek_operator import failpoints
from deepseek_operator.kube import APIKEYS, SECRETS
from deepseek_operator.names import apikey_secret_name, auth_configmap_name, base_url, legacy_signing_key_secret_name


def test_paths_for_core_and_custom_resources():
    assert SECRETS.path("ns", "s") == "/api/v1/namespaces/ns/secrets/s"
    assert APIKEYS.path("ns", "k", "status") == "/apis/deepseek.ai/v1alpha1/namespaces/ns/apikeys/k/status"
    assert APIKEYS.api_version == "deepseek.ai/v1alpha1" and SECRETS.api_version == "v1"


def test_fixed_child_names():
    assert legacy_signing_key_secret_name("chat") == "chat-signing-key" and auth_configmap_name("chat") == "chat-auth"
    assert apikey_secret_name("alice", {}) == "alice-apikey"
    assert apikey_secret_name("alice", {"secretName": "creds"}) == "creds"
    assert base_url("team", "chat") == "http://chat.team.svc:8000/v1"


def test_failpoint_only_fires_for_its_step_and_object(monkeypatch):
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(failpoints, "_hits", {})
    monkeypatch.setenv(failpoints.ENV, "apikey:after-secret@2=ns/a")
    failpoints.reached("apikey:after-pending", "ns/a")
    failpoints.reached("apikey:after-secret", "ns/b")
    failpoints.reached("apikey:after-secret", "ns/a")
    assert killed == []
    failpoints.reached("apikey:after-secret", "ns/a")
    assert len(killed) == 1


def test_failpoints_are_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    monkeypatch.setattr(os, "kill", lambda pid, sig: pytest.fail("killed"))
    failpoints.reached("apikey:after-secret", "ns/a")
