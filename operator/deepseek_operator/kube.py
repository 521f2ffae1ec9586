"""The one module that talks to the Kubernetes API: JSON over HTTP with fixed names and a field manager.

Handlers never build URLs or bodies by hand; they call these helpers with whole objects (dicts).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .names import FIELD_MANAGER, GROUP, VERSION, controlled_by

log = logging.getLogger(__name__)
LIST_PAGE_SIZE = 500
# Metadata only (no `data` of a Secret ever reaches the operator): the API server's PartialObjectMetadata views.
METADATA_LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


@dataclass(frozen=True)
class Resource:
    """A namespaced resource type: where its objects live under the API."""

    group: str
    version: str
    plural: str
    kind: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{root}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    def collection_path(self, namespace: str | None) -> str:
        """The objects of one namespace, or of every namespace (None)."""
        if namespace is not None:
            return self.path(namespace)
        root = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{root}/{self.plural}"

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"


SECRETS = Resource("", "v1", "secrets", "Secret")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
EVENTS = Resource("", "v1", "events", "Event")
APIKEYS = Resource(GROUP, VERSION, "apikeys", "ApiKey")
DEEPSEEKDEPLOYMENTS = Resource(GROUP, VERSION, "deepseekdeployments", "DeepSeekDeployment")


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status, `reason` Kubernetes' reason (Conflict, NotFound, ...)."""

    def __init__(self, status: int, reason: str, message: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason


def namespace_terminating(error: BaseException) -> bool:
    """Whether the API server refused to create an object because its namespace is being deleted."""
    return isinstance(error, KubeError) and error.status == 403 and "because it is being terminated" in str(error)


class Conflict(KubeError):
    """409: the object changed since it was read (or already exists)."""


class NotFound(KubeError):
    """404."""


class Gone(KubeError):
    """410: a watch's resourceVersion is too old; list again."""


class NotOwned(KubeError):
    """An object has the name the operator needs, and its owner does not control it: it was left untouched."""

    def __init__(self, resource: Resource, actual: Mapping[str, Any]) -> None:
        meta = actual["metadata"]
        self.kind, self.namespace, self.name = resource.kind, str(meta["namespace"]), str(meta["name"])
        controller = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
        holder = (f"controlled by {controller.get('kind')} {controller.get('name')} (uid {controller.get('uid')})"
                  if controller else "controlled by nothing (no controller ownerReference)")
        self.description = (f"{self.kind} {self.namespace}/{self.name} already exists and is not this "
                            f"DeepSeekDeployment's: it is {holder}")
        super().__init__(409, "NotOwned", self.description, "GET", resource.path(self.namespace, self.name))


def ensure_controlled(resource: Resource, actual: Mapping[str, Any], owner_uid: str) -> None:
    """Raise NotOwned unless `owner_uid` controls `actual` (never take over what someone else made)."""
    if not controlled_by(dict(actual), owner_uid):
        raise NotOwned(resource, actual)


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate to it."""

    host: str
    ssl_context: ssl.SSLContext | bool
    token: Callable[[], str | None]


class KubeConfigError(ValueError):
    """No usable kubeconfig or in-cluster service account; the message quotes nothing of the file."""


def unusable_kubeconfig(exc: BaseException) -> str | None:
    """Why loading a kubeconfig failed, for the errors besides ConfigException that it raises (None for any other),
    in words that quote nothing of the file: a YAML error's own text can, and a kubeconfig holds credentials."""
    import yaml

    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"the kubeconfig is not valid YAML{where}"
    if isinstance(exc, OSError):
        return f"the kubeconfig could not be read ({exc.strerror or type(exc).__name__}: {exc.filename or ''})"
    if isinstance(exc, AttributeError | TypeError | ValueError):  # YAML, but a list or a string
        return "the kubeconfig is not a kubeconfig (a mapping of clusters, users and contexts)"
    return None


def load_connection(kubeconfig: str | None = None) -> Connection:
    """From a kubeconfig file (or $KUBECONFIG, ~/.kube/config), else the in-cluster service account; KubeConfigError
    when neither can be used."""
    import yaml
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except config.ConfigException as exc:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as incluster:
            raise KubeConfigError(f"no usable kubeconfig ({exc}) and not in a cluster ({incluster}); set "
                                  "KUBECONFIG or pass --kubeconfig") from None
    except (yaml.YAMLError, OSError, AttributeError, TypeError, ValueError) as exc:
        raise KubeConfigError(str(unusable_kubeconfig(exc))) from None

    def token() -> str | None:
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)
        value = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
        if value and not value.lower().startswith("bearer "):
            value = f"Bearer {value}"
        return value

    context: ssl.SSLContext | bool = False
    if configuration.host.startswith("https"):
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return Connection(host=configuration.host.rstrip("/"), ssl_context=context, token=token)


def request_kind(method: str, path: str) -> str:
    """`VERB resource[/subresource]` of an API request, as apiserver_request_total splits them (pure)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2:]
    else:
        rest = parts[3:] if parts[:1] == ["apis"] else parts[2:]
    resource = rest[0] if rest else ""
    if len(rest) > 2:
        resource += f"/{rest[2]}"
    verb = "LIST" if method == "GET" and len(rest) == 1 else method
    return f"{verb} {resource}"


def request_pool(thread_name: str) -> str:
    """The worker pool a request was sent from, by its thread's name (`apikey_3` -> `apikey`) (pure)."""
    base = thread_name.rsplit("_", 1)[0] if "_" in thread_name else thread_name
    return "secret-watch" if base.startswith("secret-watch") else base


class KubeApi:
    """Thread-safe JSON client for the few calls the operator makes."""

    def __init__(self, connection: Connection, *, max_connections: int = 32, timeout: float = 30.0) -> None:
        # Requests sent and seconds spent waiting for their answers, by `VERB resource` (see request_kind): on the
        # liveness endpoint, for benchmarks.
        self.request_counts: Counter[str] = Counter()
        self.request_seconds: Counter[str] = Counter()
        # Requests by the pool that sent them (see request_pool) and `VERB resource`, e.g. `apikey GET secrets`:
        # ApiKey work (pools `apikey`, `issue`, `secret-watch`) apart from DeepSeekDeployments' (`reconcile`).
        self.request_counts_by_pool: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._connection = connection
        self._http = httpx.Client(
            base_url=connection.host,
            verify=connection.ssl_context,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def close(self) -> None:
        self._http.close()

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        token = self._connection.token()
        if token:
            headers["Authorization"] = token
        return headers

    def _count(self, kind: str, started: float) -> None:
        with self._counts_lock:
            self.request_counts[kind] += 1
            self.request_seconds[kind] += time.monotonic() - started
            self.request_counts_by_pool[f"{request_pool(threading.current_thread().name)} {kind}"] += 1

    @staticmethod
    def _raise_for(response: httpx.Response, method: str, path: str) -> None:
        if response.status_code < 400:
            return
        try:
            detail = response.json()
            reason, message = str(detail.get("reason", "")), str(detail.get("message", ""))
        except ValueError:
            reason, message = "", response.text[:200]
        error = {404: NotFound, 409: Conflict, 410: Gone}.get(response.status_code, KubeError)
        raise error(response.status_code, reason, message, method, path)

    def _request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                 content_type: str = "application/json", accept: str = "application/json") -> dict[str, Any]:
        headers = self._headers(accept)
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body, separators=(",", ":"))
        started = time.monotonic()
        try:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
        finally:
            self._count(request_kind(method, path), started)
        self._raise_for(response, method, path)
        return response.json() if response.content else {}

    def unserved(self, resources: Sequence[Resource]) -> list[Resource]:
        """Those of `resources` the API server does not serve (a CRD not installed, or not established yet)."""
        served: dict[str, set[str]] = {}
        missing = []
        for resource in resources:
            if resource.api_version not in served:
                root = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.api_version}"
                try:
                    listed = self._request("GET", root).get("resources") or []
                except NotFound:  # the group or version itself is not served
                    listed = []
                served[resource.api_version] = {entry.get("name") for entry in listed}
            if resource.plural not in served[resource.api_version]:
                missing.append(resource)
        return missing

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._request("GET", resource.path(namespace, name))
        except NotFound:
            return None

    def list(self, resource: Resource, namespace: str | None, *, label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object in `namespace` (None: every namespace), read in pages of LIST_PAGE_SIZE, so that 10,000 keys
        are not one response."""
        params = {"labelSelector": label_selector} if label_selector else {}
        if field_selector:
            params["fieldSelector"] = field_selector
        params["limit"] = str(LIST_PAGE_SIZE)
        items: list[dict[str, Any]] = []
        while True:
            page = self._request("GET", resource.collection_path(namespace), params=params)
            items.extend(page.get("items", []))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params["continue"] = token

    def list_metadata(self, resource: Resource, namespace: str | None, *,
                      label_selector: str) -> tuple[list[dict[str, Any]], str]:
        """The metadata (PartialObjectMetadata: never a Secret's data) of every matching object in `namespace`
        (None: every namespace), read in pages; and the resourceVersion to watch from."""
        params = {"labelSelector": label_selector, "limit": str(LIST_PAGE_SIZE)}
        items: list[dict[str, Any]] = []
        while True:
            page = self._request("GET", resource.collection_path(namespace), params=params,
                                 accept=METADATA_LIST_ACCEPT)
            items.extend(page.get("items") or [])  # an empty PartialObjectMetadataList has `"items": null`
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            params["continue"] = meta["continue"]

    def watch_metadata(self, resource: Resource, namespace: str | None, *, label_selector: str,
                       resource_version: str, timeout_seconds: int = 300) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, object metadata) from `resource_version` on, until the server ends the watch (after about
        `timeout_seconds`); BOOKMARK events carry only a newer resourceVersion. Raises Gone when that version is
        too old (list again)."""
        path = resource.collection_path(namespace)
        params = {"labelSelector": label_selector, "watch": "true", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        started = time.monotonic()
        self._count(f"WATCH {resource.plural}", started)
        timeout = httpx.Timeout(30.0, read=timeout_seconds + 30.0)
        with self._http.stream("GET", path, params=params, headers=self._headers(METADATA_ACCEPT),
                               timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                self._raise_for(response, "GET", path)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    code = int(obj.get("code") or 500)
                    error = Gone if code == 410 else KubeError
                    raise error(code, str(obj.get("reason", "")), str(obj.get("message", "")), "WATCH", path)
                yield str(event.get("type")), obj.get("metadata") or {}

    def create(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create; raises Conflict when the name is taken."""
        return self._request("POST", resource.path(namespace), body=body, params={"fieldManager": FIELD_MANAGER})

    def replace(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace; `body.metadata.resourceVersion` guards against lost updates (Conflict)."""
        name = body["metadata"]["name"]
        return self._request("PUT", resource.path(namespace, name), body=body, params={"fieldManager": FIELD_MANAGER})

    def replace_status(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Write the status subresource whole, guarded by `body.metadata.resourceVersion`."""
        name = body["metadata"]["name"]
        return self._request("PUT", resource.path(namespace, name, "status"), body=body,
                             params={"fieldManager": FIELD_MANAGER})

    def merge(self, resource: Resource, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch an object; a `metadata.resourceVersion` in the patch makes it conditional (Conflict)."""
        return self._request("PATCH", resource.path(namespace, name), body=patch,
                             params={"fieldManager": FIELD_MANAGER}, content_type="application/merge-patch+json")

    def json_patch(self, resource: Resource, namespace: str, name: str,
                   operations: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply a JSON patch (RFC 6902) to an object: its `test` operations make it conditional (a failed test is
        a 422)."""
        return self._request("PATCH", resource.path(namespace, name), body=operations,
                             params={"fieldManager": FIELD_MANAGER}, content_type="application/json-patch+json")

    def merge_status(self, resource: Resource, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch part of the status subresource (for status owned by several parts of one reconcile)."""
        return self._request("PATCH", resource.path(namespace, name, "status"), body={"status": status},
                             params={"fieldManager": FIELD_MANAGER}, content_type="application/merge-patch+json")

    def apply(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply `body` (apiVersion, kind, metadata.name and the fields the operator owns) as the
        operator's field manager; a `metadata.resourceVersion` in it makes the apply conditional (Conflict)."""
        name = body["metadata"]["name"]
        return self._request("PATCH", resource.path(namespace, name), body=body,
                             params={"fieldManager": FIELD_MANAGER, "force": "true"},
                             content_type="application/apply-patch+yaml")

    def delete(self, resource: Resource, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete (only the object with `uid`, if given); False when it was already gone."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._request("DELETE", resource.path(namespace, name), body=body)
        except NotFound:
            return False
        return True

    def delete_collection(self, resource: Resource, namespace: str) -> None:
        """Delete every object of `resource` in `namespace` in one request (the answer, the objects, is dropped)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        self._request("DELETE", resource.path(namespace), body=body)

    def ensure_namespace(self, name: str) -> bool:
        """Create the namespace unless it exists (for runs outside a cluster); True when it was created."""
        try:
            self._request("GET", f"/api/v1/namespaces/{name}")
            return False
        except NotFound:
            pass
        try:
            self._request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": name}},
                          params={"fieldManager": FIELD_MANAGER})
        except Conflict:
            return False
        return True

    def create_or_replace(
        self, resource: Resource, namespace: str, desired: dict[str, Any],
        *, up_to_date: Callable[[dict[str, Any], dict[str, Any]], bool], attempts: int = 5,
        owner_uid: str | None = None,
    ) -> dict[str, Any]:
        """Make the object equal `desired`: create it (AlreadyExists counts as success and is then compared),
        or replace it when `up_to_date(actual, desired)` says it differs. With `owner_uid`, an existing object that
        owner does not control raises NotOwned and is not written."""
        name = desired["metadata"]["name"]
        for _ in range(attempts):
            actual = self.get(resource, namespace, name)
            if actual is None:
                try:
                    return self.create(resource, namespace, desired)
                except Conflict:
                    continue
            if owner_uid is not None:
                ensure_controlled(resource, actual, owner_uid)
            if up_to_date(actual, desired):
                return actual
            body = dict(desired)
            body["metadata"] = {**desired["metadata"], "resourceVersion": actual["metadata"]["resourceVersion"]}
            try:
                return self.replace(resource, namespace, body)
            except (Conflict, NotFound):
                continue
        raise KubeError(409, "Conflict", f"{resource.kind} {namespace}/{name} kept changing; will retry",
                        "PUT", resource.path(namespace, name))

    def create_or_apply(
        self, resource: Resource, namespace: str, desired: dict[str, Any], *, owner_uid: str,
        up_to_date: Callable[[dict[str, Any], dict[str, Any]], bool], attempts: int = 5,
    ) -> dict[str, Any]:
        """Create `desired`, or server-side apply it over the object `owner_uid` controls when `up_to_date(actual,
        desired)` says it differs; an object that owner does not control raises NotOwned and is not written."""
        name = desired["metadata"]["name"]
        for _ in range(attempts):
            actual = self.get(resource, namespace, name)
            if actual is None:
                try:
                    return self.create(resource, namespace, desired)
                except Conflict:
                    continue
            ensure_controlled(resource, actual, owner_uid)
            if up_to_date(actual, desired):
                return actual
            # Conditional on what was checked: an object replaced since by someone else's is not applied over.
            body = {**desired, "metadata": {**desired["metadata"],
                                            "resourceVersion": actual["metadata"]["resourceVersion"]}}
            try:
                return self.apply(resource, namespace, body)
            except (Conflict, NotFound):
                continue
        raise KubeError(409, "Conflict", f"{resource.kind} {namespace}/{name} kept changing; will retry",
                        "PATCH", resource.path(namespace, name))

    def write(
        self, resource: Resource, namespace: str, desired: dict[str, Any], *, current: dict[str, Any] | None,
        up_to_date: Callable[[dict[str, Any], dict[str, Any]], bool],
    ) -> dict[str, Any]:
        """Like `create_or_replace`, skipping the read when the caller has just read the object (`current`)."""
        try:
            if current is None:
                return self.create(resource, namespace, desired)
            body = dict(desired)
            body["metadata"] = {**desired["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
            return self.replace(resource, namespace, body)
        except (Conflict, NotFound):
            return self.create_or_replace(resource, namespace, desired, up_to_date=up_to_date)

    def post_event(self, involved: Mapping[str, Any], *, type_: str, reason: str, message: str) -> None:
        """Record an Event on `involved` (best effort: an Event that cannot be written is only logged)."""
        meta = involved["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.create(EVENTS, meta["namespace"], body)
        except KubeError as exc:
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
