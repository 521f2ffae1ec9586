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


class CappedConfigMapStore(ConfigMapStore):
    """Refuses ConfigMaps past 1 MiB of data with 422, as the API server does."""

    def _store(self, body):
        from deepseek_operator.auth_config import CONFIGMAP_LIMIT, configmap_size
        from deepseek_operator.kube import KubeError

        if configmap_size(body.get("data") or {}, body.get("binaryData") or {}) > CONFIGMAP_LIMIT:
            raise KubeError(422, "Invalid", "ConfigMap is invalid: []: Too long: must have at most 1048576 bytes",
                            "PUT", body["metadata"]["name"])
        return super()._store(body)


def _random_id(rng, n=16):
    import base64

    return base64.urlsafe_b64encode(rng.randbytes(n)).rstrip(b"=").decode()


def test_a_full_auth_configmap_refuses_new_keys_but_always_takes_revocations_and_deletions():
    import random

    import pytest
    from deepseek_operator.auth_config import CONFIGMAP_LIMIT, NEW_ENTRY_BUDGET, configmap_size
    from deepseek_operator.auth_store import AuthConfigFull

    rng = random.Random(7)
    api = CappedConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    limits = {"rps": 5, "burst": 10, "tpm": 100_000, "parallel": 4}
    refused_at = None
    for batch in range(20):
        # Each round: 6,000 rotations (revocations) and 750 new keys with their own limits.
        revoked = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(6_000)}
        new_key = [SetKeyLimits(f"uid-{batch}-{i}", limits) for i in range(750)]
        try:
            store.commit("ns", "chat", [RevokeTokens(revoked), *new_key], owner=OWNER)
        except AuthConfigFull as exc:
            refused_at = batch
            assert "new" in str(exc) and "KiB" in str(exc)
            break
    assert refused_at is not None, "new keys must be refused before the ConfigMap reaches 1 MiB"
    stored = api.objects["chat-auth"]
    docs = decode_documents(stored.get("data"), stored.get("binaryData"))
    assert set(revoked) <= set(docs.revoked), "the refused commit's revocations are stored all the same"
    assert f"uid-{refused_at}-0" not in docs.limits
    assert configmap_size(stored.get("data") or {}, stored.get("binaryData") or {}) > NEW_ENTRY_BUDGET
    usage = store.usage("ns", "chat")
    assert usage is not None and usage > NEW_ENTRY_BUDGET
    # Over the new-key budget: revocations, limit removals (deleted keys) and edits still land.
    more = {_random_id(rng): 900_000 for _ in range(500)}
    store.commit("ns", "chat", [RevokeTokens(more), SetKeyLimits("uid-0-0", None),
                                SetKeyLimits("uid-0-1", {**limits, "rps": 1})], owner=OWNER)
    docs = decode_documents(api.objects["chat-auth"].get("data"), api.objects["chat-auth"].get("binaryData"))
    assert set(more) <= set(docs.revoked)
    assert "uid-0-0" not in docs.limits and docs.limits["uid-0-1"]["rps"] == 1
    assert configmap_size(api.objects["chat-auth"].get("data") or {},
                          api.objects["chat-auth"].get("binaryData") or {}) < CONFIGMAP_LIMIT
    with pytest.raises(AuthConfigFull):
        store.commit("ns", "chat", [SetKeyLimits("brand-new", limits)], owner=OWNER)


def test_a_batch_that_cannot_fit_at_all_stores_nothing_and_says_so():
    import random

    import pytest
    from deepseek_operator.auth_store import AuthConfigFull
    from deepseek_operator.kube import KubeError

    rng = random.Random(5)
    api = CappedConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 900_000})], owner=OWNER)
    writes = api.writes
    flood = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(60_000)}
    with pytest.raises(KubeError) as raised:
        store.commit("ns", "chat", [RevokeTokens(flood)], owner=OWNER)
    # Not AuthConfigFull: that would tell the caller its revocations were stored.
    assert not isinstance(raised.value, AuthConfigFull) and raised.value.status == 422
    assert "not even revocations fit" in str(raised.value)
    assert api.writes == writes
