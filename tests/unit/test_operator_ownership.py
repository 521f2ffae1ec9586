"""The operator never takes over an object it does not control: the ownership test, the Conflict condition, and the
auth ConfigMap store facing someone else's ConfigMap of the same name."""

from __future__ import annotations

import copy

import pytest
from deepseek_operator.auth_config import (
    AuthDocuments,
    RevokeTokens,
    SetKeyLimits,
    build_auth_configmap,
    decode_documents,
)
from deepseek_operator.auth_store import AuthConfigStore
from deepseek_operator.deployment_status import conflict_condition
from deepseek_operator.kube import CONFIGMAPS, Conflict, NotFound, NotOwned, ensure_controlled
from deepseek_operator.names import controlled_by, owner_reference

OWNER = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
         "metadata": {"name": "chat", "namespace": "ns", "uid": "dsd-uid"}}


def obj(*refs: dict) -> dict:
    return {"metadata": {"name": "chat", "namespace": "ns", "ownerReferences": list(refs)}}


def test_only_a_controller_reference_with_the_owners_uid_counts():
    assert controlled_by(obj(owner_reference(OWNER)), "dsd-uid")
    assert not controlled_by(obj(), "dsd-uid")
    assert not controlled_by(obj(owner_reference(OWNER, controller=False)), "dsd-uid")
    stale = owner_reference({**OWNER, "metadata": {**OWNER["metadata"], "uid": "deleted-uid"}})
    assert not controlled_by(obj(stale), "dsd-uid")


def test_not_owned_names_the_object_and_its_controller():
    with pytest.raises(NotOwned) as caught:
        ensure_controlled(CONFIGMAPS, obj(), "dsd-uid")
    assert caught.value.description.startswith("ConfigMap ns/chat already exists")
    assert "no controller" in caught.value.description
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "uid": "u2"}}
    with pytest.raises(NotOwned) as caught:
        ensure_controlled(CONFIGMAPS, obj(owner_reference(other)), "dsd-uid")
    assert "Deployment web (uid u2)" in caught.value.description
    assert not issubclass(NotOwned, Conflict), "retry loops that re-read on 409 must not swallow it"


def test_conflict_condition_reports_clears_and_stays_quiet_when_nothing_changes():
    assert conflict_condition([], []) is None, "no Conflict condition on a deployment that never had one"
    raised = conflict_condition([], ["Service ns/chat already exists"])
    assert raised is not None and raised.status is True and raised.reason == "NotOwned"
    assert "Service ns/chat" in raised.message and "delete or rename it" in raised.message
    stored = [{"type": "Conflict", "status": "True", "reason": raised.reason, "message": raised.message}]
    assert conflict_condition(stored, ["Service ns/chat already exists"]) is None, "unchanged: no write, no Event"
    cleared = conflict_condition(stored, [])
    assert cleared is not None and cleared.status is False and cleared.reason == "Resolved"


class ConfigMapStore:
    """Just enough of an API server for ConfigMaps: resourceVersion checks, 409 and 404."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.version = 0

    def get(self, resource, namespace, name):
        found = self.objects.get(name)
        return copy.deepcopy(found) if found else None

    def create(self, resource, namespace, body):
        if body["metadata"]["name"] in self.objects:
            raise Conflict(409, "AlreadyExists", "exists", "POST", body["metadata"]["name"])
        return self._store(body)

    def replace(self, resource, namespace, body):
        name = body["metadata"]["name"]
        if name not in self.objects:
            raise NotFound(404, "NotFound", "gone", "PUT", name)
        if body["metadata"].get("resourceVersion") != self.objects[name]["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict", "changed", "PUT", name)
        return self._store(body)

    def _store(self, body):
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[body["metadata"]["name"]] = stored
        return copy.deepcopy(stored)


def test_someone_elses_auth_configmap_is_neither_written_nor_carried_into_ours():
    api = ConfigMapStore()
    # Well formed, as an auth ConfigMap would be, but made by someone else (no owner).
    theirs = build_auth_configmap(name="chat-auth", namespace="ns", labels={"team": "x"}, owner_references=[],
                                  documents=AuthDocuments(config={"issuer": "theirs"}, revoked={"theirs": 9999999999},
                                                          limits={"uid-x": {"rps": 100000}}))
    api.create(CONFIGMAPS, "ns", theirs)
    squatter = copy.deepcopy(api.objects["chat-auth"])
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    documents, unknown = store.read("ns", "chat", refresh=True)
    assert documents is None and "not controlled by DeepSeekDeployment ns/chat" in unknown
    with pytest.raises(NotOwned, match="ConfigMap ns/chat-auth"):
        store.commit("ns", "chat", [RevokeTokens({"ours": 5000})], owner=OWNER)
    assert api.objects["chat-auth"] == squatter, "someone else's ConfigMap was written"
    # Once it is gone the deployment writes its own, without anything the other one held.
    del api.objects["chat-auth"]
    store.commit("ns", "chat", [RevokeTokens({"ours": 5000}), SetKeyLimits("uid-1", {"rps": 5})], owner=OWNER)
    stored = api.objects["chat-auth"]
    docs = decode_documents(stored["data"], stored.get("binaryData"))
    assert set(docs.revoked) == {"ours"} and set(docs.limits) == {"uid-1"}
    assert stored["metadata"]["ownerReferences"] == [owner_reference(OWNER)]
