"""The issuer of one DeepSeekDeployment: its signing keys (signing_key_store.py: a Secret in the operator's own
namespace) and the issuer part of its auth ConfigMap (public keys only).

`Issuers.reconcile_issuer(dsd)` is called from the DeepSeekDeployment reconcile; `Issuers.view_for` gives an
ApiKey reconcile what it needs to sign (the active, published key) without re-reading the Secret every time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .apikey_plan import IssuerView, live_token_expiry_by_kid
from .auth_config import AuthDocuments, Limits, PublishIssuer, build_issuer_config, limits_from_spec
from .auth_store import AuthConfigStore
from .key_material import new_signing_key
from .kube import APIKEYS, DEEPSEEKDEPLOYMENTS, KubeApi
from .names import audience_name, auth_configmap_name, base_url, issuer_name
from .settings import OperatorSettings
from .signing_key_store import SigningKeyStore
from .signing_keys import KeyRing, SigningKey, build_jwks, next_key_ring_change, plan_key_ring, retired_at

log = logging.getLogger(__name__)
DEPLOYMENT_CACHE_SECONDS = 2.0
# A deployment delivered by the watch (`observe_deployment`) is current until the next event; the bound only covers
# a watch that stopped delivering.
WATCHED_DEPLOYMENT_CACHE_SECONDS = 60.0
LIVE_EXPIRY_RELIST = 5  # issuer checks between listings of the ApiKeys while a retired key waits
IN_SIGNING_KEY_NAMESPACE = "InSigningKeyNamespace"


@dataclass(frozen=True)
class IssuerState:
    """The outcome of an issuer reconcile, for the deployment's status."""

    ready: bool
    reason: str
    message: str
    signing_key_id: str | None
    auth_configmap: str
    next_check: float
    # Every ApiKey must look again: the keys and limits were first written, the default limits changed, or a key
    # was withdrawn from the JWKS (see `keys_to_wake`).
    keys_affected: bool
    # The auth ConfigMap's size in bytes as last written (None when unknown).
    auth_config_size: int | None = None
    # A key was added to the JWKS (a rotation): only keys not Ready (waiting for a signer) must look again.
    waiting_keys_affected: bool = False


def keys_to_wake(before: AuthDocuments | None, jwks: dict[str, Any], limits_before: Any, limits: Any) -> str | None:
    """Which ApiKeys of a deployment an issuer reconcile must wake (pure): "all", "waiting" or None.

    A signing-key rotation adds a key to the JWKS: every token issued so far still verifies, so keys that hold one
    have nothing to do (ten thousand of them woken at each rotation would be ten thousand reads for nothing); keys
    still waiting for a signer may go on. A key leaves the JWKS only once no live token it signed remains, yet all
    keys look again then, as they do when the default limits change or the documents are first written."""
    if before is None or limits_before != limits:
        return "all"
    kids_before = {str(key.get("kid")) for key in before.jwks.get("keys", [])}
    kids = {str(key.get("kid")) for key in jwks.get("keys", [])}
    if kids_before - kids:
        return "all"
    if before.jwks != jwks:
        return "waiting"
    return None


def default_limits(dsd: dict[str, Any]) -> Limits:
    return limits_from_spec(dsd.get("spec", {}).get("rateLimit"))


class Issuers:
    """Issuer state of every deployment this operator serves (key rings cached in memory)."""

    def __init__(
        self, kube: KubeApi, auth_store: AuthConfigStore, settings: OperatorSettings,
        *, clock: Callable[[], float] = time.time, new_key: Callable[[int], SigningKey] = new_signing_key,
    ) -> None:
        self._kube = kube
        self._auth = auth_store
        self._settings = settings
        self._clock = clock
        self._new_key = new_key
        self.signing_keys = SigningKeyStore(kube, settings.key_namespace, auth_store)
        self._rings: dict[tuple[str, str], tuple[str, KeyRing]] = {}  # -> (deployment uid, ring)
        # Deployments as last read or watched (None: not found), so that a thousand keys for one deployment do not
        # read it a thousand times: (monotonic time, object, whether the watch delivered it).
        self._deployments: dict[tuple[str, str], tuple[float, dict[str, Any] | None, bool]] = {}
        self._fetch_locks: dict[tuple[str, str], threading.Lock] = {}
        self._live_expiry: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget_deployment(self, namespace: str, name: str, uid: str) -> None:
        """The deployment was deleted: delete its private keys (no owner reference reaches across namespaces).
        After a reconcile in flight (the lock); one that still rewrites them is undone by the sweep."""
        with self._lock(namespace, name):
            cached = self._rings.get((namespace, name))
            if cached is not None and cached[0] == uid:
                self._rings.pop((namespace, name), None)
            self._deployments.pop((namespace, name), None)
            self._live_expiry.pop((namespace, name), None)
            self.signing_keys.delete_for(namespace, name, uid)

    def _live_token_expiry(self, namespace: str, name: str, ring: KeyRing, now: int) -> dict[str, int]:
        """Only list the ApiKeys when a retired key might be dropped: that is the one decision that needs them."""
        policy = self._settings.rotation_policy
        candidates = [k for k in ring.keys if (stopped := retired_at(ring, k)) is not None
                      and stopped + policy.retire_margin <= now]
        if not candidates:
            return {}
        # A retired key signs nothing new, so its live-token expiry can only shrink (revocations): a recent answer
        # is a safe upper bound, and 10,000 keys are not listed on every check.
        cached = self._live_expiry.get((namespace, name))
        if cached is not None:
            listed_at, expiry = cached
            due = min([expiry.get(k.kid, 0) for k in candidates])
            if now < due and time.monotonic() - listed_at < LIVE_EXPIRY_RELIST * self._settings.issuer_check_interval:
                return expiry
        apikeys = [item for item in self._kube.list(APIKEYS, namespace)
                   if item.get("spec", {}).get("deploymentRef", {}).get("name") == name]
        expiry = live_token_expiry_by_kid(apikeys, now)
        self._live_expiry[(namespace, name)] = (time.monotonic(), expiry)
        return expiry

    def observe_deployment(self, dsd: dict[str, Any]) -> None:
        """A deployment as the watch delivered it (not deleted): ApiKey reconciles use it without a GET."""
        meta = dsd["metadata"]
        self._deployments[(meta["namespace"], meta["name"])] = (time.monotonic(), dsd, True)

    def _cached_deployment(self, key: tuple[str, str]) -> tuple[bool, dict[str, Any] | None]:
        cached = self._deployments.get(key)
        if cached is None:
            return False, None
        at, dsd, watched = cached
        fresh = time.monotonic() - at < (WATCHED_DEPLOYMENT_CACHE_SECONDS if watched else DEPLOYMENT_CACHE_SECONDS)
        return fresh, dsd

    def _deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        fresh, dsd = self._cached_deployment(key)
        if fresh:
            return dsd
        with self._locks_guard:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:  # one GET when the entry expires, not one per waiting key
            fresh, dsd = self._cached_deployment(key)
            if fresh:
                return dsd
            dsd = self._kube.get(DEEPSEEKDEPLOYMENTS, namespace, name)
            # A missing deployment is remembered briefly too: keys waiting for it do not each ask again.
            self._deployments[key] = (time.monotonic(), dsd, False)
            return dsd

    def reconcile_issuer(self, dsd: dict[str, Any]) -> IssuerState:
        """Make the signing-key Secret and the issuer's part of the auth ConfigMap match the schedule."""
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        self._deployments[(namespace, name)] = (time.monotonic(), dsd, False)
        if namespace == self.signing_keys.namespace:
            # Its pods could mount any Secret there (a Redis or token secretRef names one): every deployment's keys.
            return IssuerState(False, IN_SIGNING_KEY_NAMESPACE,
                               f"not served in namespace {namespace}: the operator keeps every deployment's private "
                               "signing keys there, which this deployment's pods could read; create it in another "
                               "namespace", None, auth_configmap_name(name),
                               self._clock() + self._settings.issuer_check_interval, False)
        with self._lock(namespace, name):
            now = int(self._clock())
            stored = self.signing_keys.read(dsd)
            ring = stored.ring
            live = self._live_token_expiry(namespace, name, ring, now)
            policy = self._settings.rotation_policy
            before, _ = self._auth.read(namespace, name, refresh=True)
            planned = plan_key_ring(ring, now=now, policy=policy, live_token_expiry=live,
                                    fresh_key=self._new_key(now),
                                    published=before.published_kids() if before is not None else None)
            # Stored before the JWKS names a new key: a key is never published that the operator could lose.
            self.signing_keys.store(dsd, stored, planned)
            added = planned.kids() - ring.kids()
            dropped = ring.kids() - planned.kids()
            if added or dropped:
                log.info("signing keys of %s/%s: added %s, dropped %s", namespace, name,
                         sorted(added), sorted(dropped))
            self._rings[(namespace, name)] = (dsd["metadata"]["uid"], planned)

            config = build_issuer_config(
                issuer=issuer_name(namespace, name), audience=audience_name(namespace, name),
                default_limits=default_limits(dsd), generation=int(dsd["metadata"].get("generation", 1)),
            )
            jwks = build_jwks(planned)
            documents = self._auth.commit(namespace, name, [PublishIssuer(config, jwks)], owner=dsd)
            # Not the config's generation: any spec edit moves it, and only the keys and limits matter to ApiKeys.
            wake = keys_to_wake(before, jwks, before.config.get("defaultLimits") if before is not None else None,
                                config["defaultLimits"])
            keys_affected, waiting_keys_affected = wake == "all", wake == "waiting"
            active = planned.active(now, documents.published_kids())
            upcoming = next_key_ring_change(planned, now=now, policy=policy, live_token_expiry=live)
            next_check = now + self._settings.issuer_check_interval
            if upcoming is not None:
                next_check = min(next_check, max(upcoming, now + 1.0))
            size = self._auth.usage(namespace, name)
            if active is None:
                return IssuerState(False, "SigningKeyNotPublished", "no published signing key can sign yet",
                                   None, auth_configmap_name(name), now + 1.0, keys_affected, size,
                                   waiting_keys_affected)
            return IssuerState(True, "SigningKeyPublished",
                               f"signing key {active.kid} signs; {len(planned.keys)} key(s) published in "
                               f"ConfigMap {auth_configmap_name(name)}",
                               active.kid, auth_configmap_name(name), next_check, keys_affected, size,
                               waiting_keys_affected)

    def view_for(
        self, namespace: str, deployment: str, apikey_uid: str
    ) -> tuple[IssuerView, dict[str, Any]] | None:
        """What an ApiKey for `namespace/deployment` signs with, and the deployment object; None if it is absent."""
        dsd = self._deployment(namespace, deployment)
        if dsd is None:
            return None
        cached = self._rings.get((namespace, deployment))
        if cached is None or cached[0] != dsd["metadata"]["uid"]:
            # First key for this deployment since start (or it was recreated): settle the issuer now.
            self.reconcile_issuer(dsd)
            cached = self._rings.get((namespace, deployment))
        ring = cached[1] if cached else KeyRing()
        documents, unknown = self._auth.read(namespace, deployment)
        published = documents.published_kids() if documents else frozenset()
        now = self._clock()
        signing = ring.active(now, published)
        spec = dsd.get("spec", {})
        view = IssuerView(
            deployment=deployment,
            issuer=issuer_name(namespace, deployment),
            audience=audience_name(namespace, deployment),
            base_url=base_url(namespace, deployment),
            signing_key=signing,
            published_kids=published,
            default_scopes=tuple(spec.get("auth", {}).get("defaultScopes") or ["model:predict"]),
            default_limits=default_limits(dsd),
            limits_entry=documents.limits.get(apikey_uid) if documents else None,
            verification_keys={k.kid: k for k in ring.keys if k.kid in published},
            revoked=documents.revoked if documents else {},
            auth_unknown=unknown,
            not_ready_message="" if signing else
            f"no signing key of deployment {deployment!r} is published in ConfigMap "
            f"{auth_configmap_name(deployment)} yet",
        )
        return view, dsd
