"""Group commit of the auth ConfigMap under contention, against an in-memory store with real 409 semantics."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

from deepseek_operator.auth_config import RevokeTokens, SetKeyLimits, decode_documents
from deepseek_operator.auth_store import AuthConfigStore
from deepseek_operator.kube import Conflict, NotFound

OWNER = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
         "metadata": {"name": "chat", "namespace": "ns", "uid": "dsd-uid"}}


class ConfigMapStore:
    """Just enough of an API server for ConfigMaps: resourceVersion checks, 409 and 404."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.version = 0
        self.writes = 0
        self.lock = threading.Lock()

    def get(self, resource, namespace, name):
        with self.lock:
            obj = self.objects.get(name)
            return copy.deepcopy(obj) if obj else None

    def create(self, resource, namespace, body):
        with self.lock:
            name = body["metadata"]["name"]
            if name in self.objects:
                raise Conflict(409, "AlreadyExists", "exists", "POST", name)
            return self._store(body)

    def replace(self, resource, namespace, body):
        with self.lock:
            name = body["metadata"]["name"]
            if name not in self.objects:
                raise NotFound(404, "NotFound", "gone", "PUT", name)
            if body["metadata"].get("resourceVersion") != self.objects[name]["metadata"]["resourceVersion"]:
                raise Conflict(409, "Conflict", "changed", "PUT", name)
            return self._store(body)

    def _store(self, body):
        self.version += 1
        self.writes += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[body["metadata"]["name"]] = stored
        return copy.deepcopy(stored)


def test_concurrent_revocations_from_many_keys_are_all_stored():
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]

    def revoke(i: int) -> None:
        store.commit("ns", "chat", [RevokeTokens({f"jti-{i}": 5000}), SetKeyLimits(f"uid-{i}", {"rps": i})],
                     owner=OWNER)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(revoke, range(300)))
    stored = api.objects["chat-auth"]
    docs = decode_documents(stored.get("data"), stored.get("binaryData"))
    assert set(docs.revoked) == {f"jti-{i}" for i in range(300)}
    assert len(docs.limits) == 300
    assert api.writes < 300, "queued changes are written together"
    assert stored["metadata"]["ownerReferences"][0]["uid"] == "dsd-uid"


def test_someone_elses_write_in_between_is_kept_not_overwritten():
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    # Another writer (a second operator instance, say) revokes "b" behind the store's cache.
    other = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    other.commit("ns", "chat", [RevokeTokens({"b": 5000})], owner=OWNER)
    store.commit("ns", "chat", [RevokeTokens({"c": 5000})], owner=OWNER)
    stored = api.objects["chat-auth"]
    assert set(decode_documents(stored["data"], stored.get("binaryData")).revoked) == {"a", "b", "c"}


def test_unchanged_documents_are_not_rewritten():
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    writes = api.writes
    store.commit("ns", "chat", [RevokeTokens({"a": 5000}), SetKeyLimits("u", None)], owner=OWNER)
    assert api.writes == writes


def test_a_deleted_configmap_is_recreated_with_every_revocation_known():
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    del api.objects["chat-auth"]
    assert store.documents("ns", "chat", refresh=True) is None
    store.commit("ns", "chat", [RevokeTokens({"b": 5000})], owner=OWNER)
    stored = api.objects["chat-auth"]
    assert set(decode_documents(stored["data"], stored.get("binaryData")).revoked) == {"a", "b"}
