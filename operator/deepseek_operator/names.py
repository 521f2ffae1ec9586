"""Fixed names, labels and owner references of what the operator makes (DESIGN.md, "What the operator makes")."""

from __future__ import annotations

import hashlib
from typing import Any

GROUP = "deepseek.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "deepseek-operator"
FINALIZER = "deepseek.ai/finalizer"
MANAGED_BY = "deepseek-operator"
SERVER_PORT = 8000


SIGNING_KEY_COMPONENT = "signing-key"
SIGNING_KEY_NAMESPACE_LABEL = "deepseek.ai/deployment-namespace"
SIGNING_KEY_UID_LABEL = "deepseek.ai/deployment-uid"


def signing_key_secret_name(namespace: str, deployment: str, uid: str) -> str:
    """The Secret that holds the private signing keys of `namespace/deployment`, in the operator's own namespace.

    `<namespace>.<deployment>.<hash>`: namespaces are DNS labels (no dots), so the prefix is unambiguous, and the
    hash of the uid gives a recreated deployment of the same name a key ring of its own. At most 63 + 40 (the CRD's
    name limit) + 12 characters, well inside a Secret name's 253.
    """
    digest = hashlib.sha256(f"{namespace}/{deployment}/{uid}".encode()).hexdigest()[:10]
    return f"{namespace}.{deployment}.{digest}"


def record_key_secret_name(deployment: str) -> str:
    """The Secret holding the key of the servers' request HMACs (audit fingerprints, response-cache keys)."""
    return f"{deployment}-record-key"


def legacy_signing_key_secret_name(deployment: str) -> str:
    """Where earlier releases kept a deployment's private keys: `<deployment>-signing-key` in its own namespace."""
    return f"{deployment}-signing-key"


def signing_key_labels(namespace: str, deployment: str, uid: str) -> dict[str, str]:
    """Labels on a signing-key Secret: which deployment (namespace, name, uid) it belongs to, for the sweep."""
    return {
        "app.kubernetes.io/name": "deepseek-server",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": SIGNING_KEY_COMPONENT,
        SIGNING_KEY_NAMESPACE_LABEL: namespace,
        "deepseek.ai/deployment": deployment,
        SIGNING_KEY_UID_LABEL: uid,
    }


def auth_configmap_name(deployment: str) -> str:
    return f"{deployment}-auth"


def apikey_secret_name(apikey_name: str, spec: dict[str, Any]) -> str:
    """`spec.secretName`, or `<apikey name>-apikey`."""
    return str(spec.get("secretName") or f"{apikey_name}-apikey")


def deployment_labels(deployment: str) -> dict[str, str]:
    """Labels on every child of a DeepSeekDeployment."""
    return {
        "app.kubernetes.io/name": "deepseek-server",
        "app.kubernetes.io/instance": deployment,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "deepseek.ai/deployment": deployment,
    }


def apikey_secret_labels(deployment: str, apikey_uid: str) -> dict[str, str]:
    """Labels on an ApiKey's Secret (the uid, since an ApiKey name may be longer than a label value)."""
    return {
        "app.kubernetes.io/name": "deepseek-apikey",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "deepseek.ai/deployment": deployment,
        "deepseek.ai/apikey-uid": apikey_uid,
    }


def issuer_name(namespace: str, deployment: str) -> str:
    """The `iss` claim of tokens for deployment `namespace/deployment` (docs/auth-contract.md)."""
    return f"deepseek-operator/{namespace}/{deployment}"


def audience_name(namespace: str, deployment: str) -> str:
    """The `aud` claim: a key for one deployment is useless on another."""
    return f"{namespace}/{deployment}"


def base_url(namespace: str, deployment: str) -> str:
    """The OpenAI-compatible base URL of the deployment's active Service."""
    return f"http://{deployment}.{namespace}.svc:{SERVER_PORT}/v1"


def pod_url(ip: str, port: int, path: str) -> str:
    """`http://IP:PORT/PATH` of a pod's address (`path` begins with `/`); an IPv6 address (IPv6 and IPv6-first
    clusters) in brackets, as a URL needs it."""
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid in the object's controlling ownerReference (`controller: true`), or None when nothing controls it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def controlled_by(obj: dict[str, Any], owner_uid: str) -> bool:
    """Whether `owner_uid` controls the object: only then may the operator change it."""
    return controller_uid(obj) == owner_uid


def owner_reference(owner: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    """An ownerReference to `owner` (a full object), so garbage collection removes the child with it."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }
