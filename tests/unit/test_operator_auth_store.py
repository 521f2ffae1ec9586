"""Group commit of the auth ConfigMap under contention, against an in-memory store with real 409 semantics."""

import copy
import threading
import time
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
        self.before_write = lambda: None  # runs before each create or replace, outside the lock

    def get(self, resource, namespace, name):
        with self.lock:
            obj = self.objects.get(name)
            return copy.deepcopy(obj) if obj else None

    def create(self, resource, namespace, body):
        self.before_write()
        with self.lock:
            name = body["metadata"]["name"]
            if name in self.objects:
                raise Conflict(409, "AlreadyExists", "exists", "POST", name)
            return self._store(body)

    def replace(self, resource, namespace, body):
        self.before_write()
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

    # The first write waits until the pool's other 31 commits have queued behind it (10 s at most): on a busy
    # machine, writes that end before the next commit starts would leave nothing to group whatever the store does.
    def queued_behind() -> None:
        deadline = time.monotonic() + 10
        while api.writes == 0 and len(store._slot("ns", "chat").queue) < 31 and time.monotonic() < deadline:
            time.sleep(0.001)
    api.before_write = queued_behind
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(revoke, range(300)))
    stored = api.objects["chat-auth"]
    docs = decode_documents(stored.get("data"), stored.get("binaryData"))
    assert set(docs.revoked) == {f"jti-{i}" for i in range(300)}
    assert len(docs.limits) == 300
    assert api.writes <= 300 - 30, "queued changes are written together"
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


def stored_documents(api: ConfigMapStore, name: str = "chat-auth"):
    """The documents as a server reads them: the index and every shard it lists."""
    from deepseek_operator.auth_config import decode_layout, index_shard_count

    index = api.objects[name]
    count = index_shard_count(index.get("data"), index.get("binaryData"))
    shards = [api.objects[f"{name}-{i}"] for i in range(count)]
    return decode_layout((index.get("data"), index.get("binaryData")),
                         [(s.get("data"), s.get("binaryData")) for s in shards])


def largest_object(api: ConfigMapStore) -> int:
    from deepseek_operator.auth_config import configmap_size

    return max(configmap_size(o.get("data") or {}, o.get("binaryData") or {}) for o in api.objects.values())


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
    from deepseek_operator.auth_config import CONFIGMAP_LIMIT, NEW_ENTRY_BUDGET
    from deepseek_operator.auth_store import AuthConfigFull

    rng = random.Random(7)
    api = CappedConfigMapStore()
    # Two shards fill after about twice what one ConfigMap held (16 by default: too slow to fill in a unit test).
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    limits = {"rps": 5, "burst": 10, "tpm": 100_000, "parallel": 4}
    refused_at = None
    for batch in range(30):
        # Each round: 6,000 rotations (revocations) and 750 new keys with their own limits.
        revoked = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(6_000)}
        new_key = [SetKeyLimits(f"uid-{batch}-{i}", limits) for i in range(750)]
        try:
            store.commit("ns", "chat", [RevokeTokens(revoked), *new_key], owner=OWNER)
        except AuthConfigFull as exc:
            refused_at = batch
            assert "new" in str(exc) and "KiB" in str(exc) and "chat-auth-" in str(exc)
            break
    assert refused_at is not None, "new keys must be refused before any ConfigMap reaches 1 MiB"
    assert refused_at >= 8, "the entries moved to shards instead of filling one ConfigMap"
    assert set(api.objects) == {"chat-auth", "chat-auth-0", "chat-auth-1"}
    docs = stored_documents(api)
    assert set(revoked) <= set(docs.revoked), "the refused commit's revocations are stored all the same"
    assert f"uid-{refused_at}-0" not in docs.limits
    assert largest_object(api) > NEW_ENTRY_BUDGET
    usage = store.usage("ns", "chat")
    assert usage is not None and usage > NEW_ENTRY_BUDGET
    assert store.new_keys_wait_reason("ns", "chat")
    # Over the new-key budget: revocations, limit removals (deleted keys) and edits still land.
    more = {_random_id(rng): 900_000 for _ in range(500)}
    store.commit("ns", "chat", [RevokeTokens(more), SetKeyLimits("uid-0-0", None),
                                SetKeyLimits("uid-0-1", {**limits, "rps": 1})], owner=OWNER)
    docs = stored_documents(api)
    assert set(more) <= set(docs.revoked)
    assert "uid-0-0" not in docs.limits and docs.limits["uid-0-1"]["rps"] == 1
    assert largest_object(api) < CONFIGMAP_LIMIT
    with pytest.raises(AuthConfigFull):
        store.commit("ns", "chat", [SetKeyLimits("brand-new", limits)], owner=OWNER)


def test_a_batch_that_cannot_fit_at_all_stores_nothing_and_says_so():
    import random

    import pytest
    from deepseek_operator.auth_store import AuthConfigFull
    from deepseek_operator.kube import KubeError

    rng = random.Random(5)
    api = CappedConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 900_000})], owner=OWNER)
    writes = api.writes
    flood = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(130_000)}
    with pytest.raises(KubeError) as raised:
        store.commit("ns", "chat", [RevokeTokens(flood)], owner=OWNER)
    # Not AuthConfigFull: that would tell the caller its revocations were stored.
    assert not isinstance(raised.value, AuthConfigFull) and raised.value.status == 422
    assert "not even revocations fit" in str(raised.value)
    assert api.writes == writes


class RecordingStore(ConfigMapStore):
    """Remembers every write as (name, shard count the index lists after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def _store(self, body):
        self.log.append(body["metadata"]["name"])
        return super()._store(body)


def test_outgrowing_one_configmap_moves_every_entry_to_shards_written_before_the_index():
    import random

    from deepseek_operator.auth_config import INLINE_BUDGET, decode_documents

    rng = random.Random(9)
    api = RecordingStore()
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=4)  # type: ignore[arg-type]
    early = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(30_000)}
    store.commit("ns", "chat", [RevokeTokens(early), SetKeyLimits("uid-a", {"rps": 1, "burst": 1})], owner=OWNER)
    assert set(api.objects) == {"chat-auth"}, "small enough: one ConfigMap, readable by servers of every version"
    assert set(decode_documents(api.objects["chat-auth"]["data"], api.objects["chat-auth"].get("binaryData"),
                                complete=True).revoked) == set(early)
    api.log.clear()
    late = {_random_id(rng): 900_000 + rng.randrange(72 * 3600) for _ in range(20_000)}
    store.commit("ns", "chat", [RevokeTokens(late)], owner=OWNER)
    assert set(api.objects) == {"chat-auth", *(f"chat-auth-{i}" for i in range(4))}
    assert api.log[-1] == "chat-auth" and sorted(api.log[:-1]) == [f"chat-auth-{i}" for i in range(4)], (
        "shards are written before the index lists them")
    docs = stored_documents(api)
    assert set(docs.revoked) == set(early) | set(late) and docs.limits == {"uid-a": {"rps": 1, "burst": 1}}
    assert api.objects["chat-auth"]["data"]["revoked.json"] == "[]", "no entries left in the index"
    assert largest_object(api) < INLINE_BUDGET
    # A later revocation rewrites the one shard it belongs to.
    writes = api.writes
    store.commit("ns", "chat", [RevokeTokens({"one-more": 900_000})], owner=OWNER)
    assert api.writes == writes + 1 and "one-more" in stored_documents(api).revoked
    # A fresh operator (restart) reads the sharded layout back and writes nothing for an unchanged state.
    restarted = AuthConfigStore(api, clock=lambda: 1000, shard_count=4)  # type: ignore[arg-type]
    writes = api.writes
    restarted.commit("ns", "chat", [RevokeTokens({"one-more": 900_000})], owner=OWNER)
    assert api.writes == writes
    assert set(restarted.documents("ns", "chat").revoked) == set(docs.revoked) | {"one-more"}


def test_a_shard_left_by_a_write_that_stopped_half_way_is_taken_over():
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    # A shard written by a migration that crashed before it replaced the index (which still holds everything).
    api.create(None, "ns", {"metadata": {"name": "chat-auth-1", "ownerReferences": [
        {"kind": "DeepSeekDeployment", "name": "chat", "uid": "dsd-uid", "controller": True}]}, "data": {}})
    import random

    from deepseek_operator.auth_config import INLINE_BUDGET

    rng = random.Random(2)
    flood = {_random_id(rng): 5000 for _ in range(int(INLINE_BUDGET / 14))}
    restarted = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    restarted.commit("ns", "chat", [RevokeTokens(flood)], owner=OWNER)
    assert "shards.json" in api.objects["chat-auth"]["data"] and "revoked.1.json.gz" in api.objects[
        "chat-auth-1"]["binaryData"]
    assert set(stored_documents(api).revoked) == {"a", *flood}


def test_shards_another_writer_filled_are_never_overwritten_from_a_stale_view():
    import random

    from deepseek_operator.auth_config import INLINE_BUDGET

    rng = random.Random(4)
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    # Another writer (a second operator instance, say) moves the entries to shards behind this store's cache.
    other = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    theirs = {_random_id(rng): 5000 for _ in range(int(INLINE_BUDGET / 14))}
    other.commit("ns", "chat", [RevokeTokens(theirs)], owner=OWNER)
    assert "chat-auth-0" in api.objects
    # This store, still seeing one small ConfigMap, gets a batch that makes it move to shards too.
    ours = {_random_id(rng): 5000 for _ in range(int(INLINE_BUDGET / 14))}
    store.commit("ns", "chat", [RevokeTokens(ours)], owner=OWNER)
    assert set(stored_documents(api).revoked) == {"a", *theirs, *ours}


def test_an_entry_in_the_wrong_shard_is_honoured_and_moved_by_the_next_write():
    import random

    from deepseek_operator.auth_config import INLINE_BUDGET, decode_shard, encode_shard, shard_of

    rng = random.Random(6)
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({_random_id(rng): 5000 for _ in range(int(INLINE_BUDGET / 14))})],
                 owner=OWNER)
    assert "chat-auth-1" in api.objects
    # Someone puts a revocation into the shard it does not hash to.
    stray = next(j for j in (f"stray-{i}" for i in range(100)) if shard_of(j, 2) == 0)
    wrong = api.objects["chat-auth-1"]
    entries = decode_shard(1, wrong.get("data"), wrong.get("binaryData"))
    entries.revoked[stray] = 5000
    wrong["data"], wrong["binaryData"] = encode_shard(1, entries)
    wrong["metadata"]["resourceVersion"] = "999"
    restarted = AuthConfigStore(api, clock=lambda: 1000, shard_count=2)  # type: ignore[arg-type]
    assert stray in restarted.documents("ns", "chat").revoked
    restarted.commit("ns", "chat", [RevokeTokens({"unrelated": 5000})], owner=OWNER)
    in_shard = [decode_shard(i, api.objects[f"chat-auth-{i}"].get("data"), api.objects[f"chat-auth-{i}"].get(
        "binaryData")).revoked for i in range(2)]
    assert stray in in_shard[0] and stray not in in_shard[1]


def hold_writes(api: ConfigMapStore) -> tuple[threading.Event, threading.Event]:
    """Make the store's next writes wait (10 s at most): (set once a write waits, set to let them go on)."""
    writing, release = threading.Event(), threading.Event()

    def held() -> None:
        writing.set()
        release.wait(10)
    api.before_write = held
    return writing, release


def test_a_read_does_not_wait_for_a_write_in_progress():
    """Issuing a key reads what is published; a ConfigMap write of another key's limits must not hold it up."""
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    store.commit("ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
    writing, release = hold_writes(api)
    with ThreadPoolExecutor(3) as pool:
        commit = pool.submit(store.commit, "ns", "chat", [RevokeTokens({"b": 5000})], owner=OWNER)
        assert writing.wait(5)
        read = pool.submit(store.read, "ns", "chat")
        documents = pool.submit(store.documents, "ns", "chat")
        try:
            (read_documents, unknown), cached = read.result(timeout=2), documents.result(timeout=2)
        finally:
            release.set()
        # what was stored when they were called: the write had not landed yet
        assert unknown == "" and set(read_documents.revoked) == {"a"}
        assert cached is read_documents
        commit.result(timeout=5)
    api.before_write = lambda: None
    read_documents, unknown = store.read("ns", "chat")  # a write that landed is seen without reading again
    assert unknown == "" and set(read_documents.revoked) == {"a", "b"}
    assert store.documents("ns", "chat") is read_documents


def test_a_read_of_a_configmap_not_known_yet_waits_for_the_write_that_creates_it():
    """No documents known (none read or written yet): a read must not answer "nothing published" while the first
    write is on its way; it waits for it."""
    api = ConfigMapStore()
    store = AuthConfigStore(api, clock=lambda: 1000)  # type: ignore[arg-type]
    writing, release = hold_writes(api)
    with ThreadPoolExecutor(2) as pool:
        commit = pool.submit(store.commit, "ns", "chat", [RevokeTokens({"a": 5000})], owner=OWNER)
        assert writing.wait(5)
        read = pool.submit(store.read, "ns", "chat")
        time.sleep(0.2)
        assert not read.done()
        release.set()
        read_documents, unknown = read.result(timeout=5)
        commit.result(timeout=5)
    assert unknown == "" and set(read_documents.revoked) == {"a"}
