"""Where a deployment's private signing keys are kept: a Secret in the operator's own namespace.

Tenants get public keys only (the `<deployment>-auth` ConfigMap), so nobody who can read Secrets or create pods in a
tenant namespace can read a private key and mint tokens. Owner references cannot cross namespaces: the Secret
carries labels naming its deployment (namespace, name, uid), is deleted when the operator sees the deployment's
deletion, and `sweep` deletes any whose deployment is gone (deleted while no operator ran).

Earlier releases kept the ring in `<deployment>-signing-key` in the tenant's namespace. The first reconcile after an
upgrade copies that ring's published keys here (same `kid`s, so tokens already issued stay valid), then deletes the
old Secret; once a deployment's ring is here, an old-layout Secret is only ever deleted, never read again.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any

from .auth_store import AuthConfigStore
from .kube import CONFIGMAPS, DEEPSEEKDEPLOYMENTS, SECRETS, KubeApi, KubeError, NotOwned
from .names import (
    MANAGED_BY,
    SIGNING_KEY_COMPONENT,
    SIGNING_KEY_NAMESPACE_LABEL,
    SIGNING_KEY_UID_LABEL,
    auth_configmap_name,
    controlled_by,
    legacy_signing_key_secret_name,
    signing_key_labels,
    signing_key_secret_name,
)
from .signing_keys import KEY_RING_DATA_KEY, KeyRing, parse_key_ring, serialize_key_ring

log = logging.getLogger(__name__)

SIGNING_KEY_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/component={SIGNING_KEY_COMPONENT}"
DEPLOYMENT_LABEL = "deepseek.ai/deployment"


def build_signing_key_secret(dsd: dict[str, Any], ring: KeyRing, key_namespace: str) -> dict[str, Any]:
    """The Secret with the deployment's private keys, in `key_namespace` (the operator's own)."""
    meta = dsd["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": signing_key_secret_name(namespace, name, uid),
            "namespace": key_namespace,
            "labels": signing_key_labels(namespace, name, uid),
        },
        "data": {KEY_RING_DATA_KEY: base64.b64encode(serialize_key_ring(ring).encode()).decode()},
    }


def signing_key_secret_up_to_date(actual: dict[str, Any], desired: dict[str, Any]) -> bool:
    labels = actual["metadata"].get("labels") or {}
    return (actual.get("data") or {}) == desired["data"] and all(
        labels.get(key) == value for key, value in desired["metadata"]["labels"].items())


def published_part(ring: KeyRing, published: frozenset[str]) -> KeyRing:
    """The keys of `ring` that servers trust (published in the JWKS): the only ones a token can have been
    verified with, so the only ones worth carrying over from an old-layout Secret."""
    return KeyRing(tuple(key for key in ring.keys if key.kid in published))


def owner_of(secret: dict[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the deployment a signing-key Secret belongs to, from its labels."""
    labels = secret["metadata"].get("labels") or {}
    namespace, name, uid = (str(labels.get(key) or "") for key in
                            (SIGNING_KEY_NAMESPACE_LABEL, DEPLOYMENT_LABEL, SIGNING_KEY_UID_LABEL))
    return (namespace, name, uid) if namespace and name and uid else None


class SigningKeyMigrationWaits(KubeError):
    """An old-layout key ring cannot be carried over yet: which of its keys are published is not known."""

    def __init__(self, namespace: str, deployment: str, problem: str) -> None:
        configmap = auth_configmap_name(deployment)
        super().__init__(503, "SigningKeyMigrationWaits",
                         f"the signing keys in Secret {namespace}/{legacy_signing_key_secret_name(deployment)} are "
                         f"moved once ConfigMap {namespace}/{configmap} can be read ({problem})",
                         "GET", CONFIGMAPS.path(namespace, configmap))


@dataclass(frozen=True)
class StoredRing:
    """A deployment's key ring as read: `secret` is its Secret in the key namespace (None: not written yet),
    `legacy` an old-layout Secret of the deployment's that is deleted once the ring is stored."""

    ring: KeyRing
    # The Secrets hold the private keys: never in a repr (a traceback, a debug log)
    secret: dict[str, Any] | None = field(repr=False)
    legacy: dict[str, Any] | None = field(repr=False)


class SigningKeyStore:
    """The signing-key Secrets of every deployment, in one namespace only the operator reads."""

    def __init__(self, kube: KubeApi, namespace: str, auth_store: AuthConfigStore) -> None:
        self._kube = kube
        self.namespace = namespace
        self._auth = auth_store
        # Deployment uids already seen without an old-layout Secret: not looked for again by this process.
        self._legacy_checked: set[str] = set()

    def prepare(self, *, create_namespace: bool) -> None:
        """Outside a cluster (development, tests) create the key namespace if it is missing; in a cluster it is
        the operator pod's own."""
        if create_namespace and self._kube.ensure_namespace(self.namespace):
            log.info("created namespace %s for the signing keys", self.namespace)

    def read(self, dsd: dict[str, Any]) -> StoredRing:
        """The deployment's key ring; from an old-layout Secret (published keys only) while there is none here."""
        meta = dsd["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        secret = self._kube.get(SECRETS, self.namespace, signing_key_secret_name(namespace, name, uid))
        if secret is not None:
            if owner_of(secret) != (namespace, name, uid):
                raise NotOwned(SECRETS, secret)
            legacy = None if uid in self._legacy_checked else self._owned_legacy(namespace, name, uid)
            if legacy is None:
                self._legacy_checked.add(uid)
            return StoredRing(self._parse(secret), secret, legacy)
        legacy = self._owned_legacy(namespace, name, uid)
        if legacy is None:
            self._legacy_checked.add(uid)
            return StoredRing(KeyRing(), None, None)
        return StoredRing(self._carried_over(namespace, name, legacy), None, legacy)

    def store(self, dsd: dict[str, Any], stored: StoredRing, ring: KeyRing) -> None:
        """Write `ring` to the deployment's Secret (when it changed), then delete an old-layout Secret."""
        meta = dsd["metadata"]
        desired = build_signing_key_secret(dsd, ring, self.namespace)
        if stored.secret is None or ring != stored.ring or not signing_key_secret_up_to_date(stored.secret, desired):
            self._kube.create_or_replace(SECRETS, self.namespace, desired, up_to_date=signing_key_secret_up_to_date)
        if stored.legacy is not None:
            legacy_meta = stored.legacy["metadata"]
            self._kube.delete(SECRETS, meta["namespace"], legacy_meta["name"], uid=legacy_meta["uid"])
            self._legacy_checked.add(meta["uid"])
            log.info("signing keys of %s/%s moved to Secret %s/%s; Secret %s/%s deleted", meta["namespace"],
                     meta["name"], self.namespace, desired["metadata"]["name"], meta["namespace"], legacy_meta["name"])

    def delete_for(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the key ring of the deployment `namespace/name` with `uid` (it was deleted); False if gone."""
        self._legacy_checked.discard(uid)
        deleted = self._kube.delete(SECRETS, self.namespace, signing_key_secret_name(namespace, name, uid))
        if deleted:
            log.info("deleted the signing keys of deleted deployment %s/%s", namespace, name)
        return deleted

    def sweep(self) -> list[str]:
        """Delete the signing-key Secrets whose deployment (by uid) no longer exists; the names deleted.

        A deployment that cannot be read (no access to its namespace any more, the API failing) keeps its keys:
        only a definite "not found" or another uid under that name counts as gone.
        """
        deleted = []
        for secret in self._kube.list(SECRETS, self.namespace, label_selector=SIGNING_KEY_SELECTOR):
            owner = owner_of(secret)
            if owner is None:
                continue
            namespace, name, uid = owner
            try:
                dsd = self._kube.get(DEEPSEEKDEPLOYMENTS, namespace, name)
            except KubeError as exc:
                log.info("signing keys of %s/%s kept: the deployment cannot be read (%s %s)", namespace, name,
                         exc.status, exc.reason)
                continue
            if dsd is not None and dsd["metadata"]["uid"] == uid:
                continue
            meta = secret["metadata"]
            if self._kube.delete(SECRETS, self.namespace, meta["name"], uid=meta["uid"]):
                log.info("deleted the signing keys of %s/%s (uid %s): that deployment no longer exists",
                         namespace, name, uid)
                deleted.append(meta["name"])
        return deleted

    def _parse(self, secret: dict[str, Any]) -> KeyRing:
        raw = (secret.get("data") or {}).get(KEY_RING_DATA_KEY, "")
        try:
            return parse_key_ring(base64.b64decode(raw).decode())
        except ValueError as exc:
            meta = secret["metadata"]
            log.warning("signing-key Secret %s/%s is unreadable (%s); issuing a new key ring", meta["namespace"],
                        meta["name"], exc)
            return KeyRing()

    def _owned_legacy(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
        """The old-layout Secret if the deployment controls it; someone else's of that name is left alone."""
        legacy = self._kube.get(SECRETS, namespace, legacy_signing_key_secret_name(name))
        return legacy if legacy is not None and controlled_by(legacy, uid) else None

    def _carried_over(self, namespace: str, name: str, legacy: dict[str, Any]) -> KeyRing:
        """The old ring's keys that the auth ConfigMap publishes. A key never published verified no token; and
        keys planted in a Secret the operator did not write (a tenant can create one with an owner reference)
        are not adopted unless the operator's own ConfigMap already trusts them."""
        documents, problem = self._auth.read(namespace, name, refresh=True)
        if documents is None:
            if self._kube.get(CONFIGMAPS, namespace, auth_configmap_name(name)) is not None:
                raise SigningKeyMigrationWaits(namespace, name, problem)
            published: frozenset[str] = frozenset()  # nothing published: no server accepts any of its tokens
        else:
            published = documents.published_kids()
        old = self._parse(legacy)
        ring = published_part(old, published)
        dropped = len(old.keys) - len(ring.keys)
        log.info("carrying %d signing key(s) of %s/%s over from Secret %s/%s%s", len(ring.keys), namespace, name,
                 namespace, legacy["metadata"]["name"], f" ({dropped} unpublished left behind)" if dropped else "")
        return ring
