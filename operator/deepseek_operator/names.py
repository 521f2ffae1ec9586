"""Fixed names, labels and owner references of what the operator makes (DESIGN.md, "What the operator makes")."""

from __future__ import annotations

from typing import Any

GROUP = "deepseek.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "deepseek-operator"
FINALIZER = "deepseek.ai/finalizer"
MANAGED_BY = "deepseek-operator"
SERVER_PORT = 8000


def signing_key_secret_name(deployment: str) -> str:
    return f"{deployment}-signing-key"


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
