"""Where private signing keys are kept (pure parts): the Secret's name, labels and content in the key namespace."""

import base64
import re

from deepseek_operator.names import signing_key_labels, signing_key_secret_name
from deepseek_operator.signing_key_store import (
    build_signing_key_secret,
    owner_of,
    published_part,
    signing_key_secret_up_to_date,
)
from deepseek_operator.signing_keys import KEY_RING_DATA_KEY, KeyRing, parse_key_ring, signing_key_from_seed

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
UID = "6f1c2a52-0d7e-4b55-9a3e-2f4c1f9e8a11"
KEYS = tuple(signing_key_from_seed(bytes([n]) * 32, created_at=n, sign_from=n) for n in (1, 2, 3))


def dsd(namespace="team-a", name="chat", uid=UID):
    return {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
            "metadata": {"namespace": namespace, "name": name, "uid": uid}}


def test_secret_name_is_unique_per_deployment_and_a_valid_name_at_the_longest():
    name = signing_key_secret_name("team-a", "chat", UID)
    assert name.startswith("team-a.chat.") and DNS_SUBDOMAIN.match(name)
    # A recreated deployment (new uid) and a namesake in another namespace get rings of their own.
    assert len({name, signing_key_secret_name("team-a", "chat", "other-uid"),
                signing_key_secret_name("team-b", "chat", UID),
                signing_key_secret_name("team-a", "chat2", UID)}) == 4
    # Dots never make two pairs collide: namespaces are DNS labels (no dots).
    assert signing_key_secret_name("a", "b-c", UID) != signing_key_secret_name("a-b", "c", UID)
    longest = signing_key_secret_name("n" * 63, "d" * 40, UID)  # namespace limit, the CRD's name limit
    assert len(longest) <= 253 and DNS_SUBDOMAIN.match(longest)


def test_secret_lives_in_the_key_namespace_with_labels_back_to_its_deployment_and_no_owner_reference():
    ring = KeyRing(KEYS)
    secret = build_signing_key_secret(dsd(), ring, "deepseek-system")
    meta = secret["metadata"]
    assert meta["namespace"] == "deepseek-system" and "ownerReferences" not in meta
    assert meta["labels"] == signing_key_labels("team-a", "chat", UID)
    assert owner_of(secret) == ("team-a", "chat", UID)
    assert parse_key_ring(base64.b64decode(secret["data"][KEY_RING_DATA_KEY]).decode()) == ring
    assert signing_key_secret_up_to_date(secret, secret)
    relabelled = {**secret, "metadata": {**meta, "labels": {**meta["labels"], "deepseek.ai/deployment-uid": "x"}}}
    assert not signing_key_secret_up_to_date(relabelled, secret)
    assert not signing_key_secret_up_to_date(build_signing_key_secret(dsd(), KeyRing(KEYS[:1]), "x"), secret)


def test_a_secret_without_all_three_labels_belongs_to_no_deployment():
    secret = build_signing_key_secret(dsd(), KeyRing(KEYS), "ops")
    del secret["metadata"]["labels"]["deepseek.ai/deployment-namespace"]
    assert owner_of(secret) is None


def test_only_published_keys_are_carried_over_with_their_ids_and_schedule():
    kept = published_part(KeyRing(KEYS), frozenset({KEYS[0].kid, KEYS[2].kid, "unknown"}))
    assert kept == KeyRing((KEYS[0], KEYS[2]))
    assert published_part(KeyRing(KEYS), frozenset()) == KeyRing()


def test_a_stored_ring_repr_holds_no_secret_data():
    from deepseek_operator.signing_key_store import StoredRing

    ring = KeyRing(KEYS)
    secret = build_signing_key_secret(dsd(), ring, "deepseek-operator")
    stored = StoredRing(ring, secret, {"data": {"signing-key": "bGVnYWN5LXByaXZhdGU="}})
    text = repr(stored)
    assert secret["data"][KEY_RING_DATA_KEY] not in text and "bGVnYWN5LXByaXZhdGU=" not in text
    assert all(key.seed not in text for key in KEYS)
