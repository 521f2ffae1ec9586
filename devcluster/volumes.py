"""A pod's volumes materialized on the host, and kept in sync with their sources like the kubelet does.

Every volume lives in ``<pod dir>/volumes/<volume name>``; processes see it at its real ``mountPath`` because
``devcluster.processes`` bind-mounts it there inside the container's private mount namespace.

- Secret, ConfigMap, downwardAPI and projected volumes (secret, configMap, downwardAPI, serviceAccountToken) are
  written the kubelet's way (``AtomicWriter``): files live in a timestamped ``..<time>`` folder, ``..data`` links to
  it and each key is a symlink through ``..data``, so an update swaps every file at once. ``refresh`` re-reads the
  sources (the runtime calls it every second); a source that disappears later keeps its last content.
- serviceAccountToken comes from the TokenRequest API, bound to the pod, and is renewed at 80% of its lifetime.
- emptyDir is a plain folder; hostPath is the host path itself; a persistentVolumeClaim works when it is bound to a
  PersistentVolume of type hostPath or local (its path is used). Other volume types are refused with a message.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from devcluster.runtime import Pod

DEFAULT_MODE = 0o644
TOKEN_DEFAULT_SECONDS = 3600


class VolumeError(RuntimeError):
    """A volume cannot be made yet (a source is missing) or at all (unsupported type)."""


Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)


class SourceReader:
    """Reads Secrets, ConfigMaps and PVCs once per sync round (``clear`` starts a new round)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self._memo: dict[tuple[str, str, str], dict[str, Any] | None] = {}

    def clear(self) -> None:
        self._memo.clear()

    def _get(self, kind: str, namespace: str, name: str, read: Callable[..., Any]) -> dict[str, Any] | None:
        key = (kind, namespace, name)
        if key not in self._memo:
            try:
                obj = read(name, namespace) if namespace else read(name)
                self._memo[key] = self.core.api_client.sanitize_for_serialization(obj)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                self._memo[key] = None
        return self._memo[key]

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self._get("Secret", namespace, name, self.core.read_namespaced_secret)
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self._get("ConfigMap", namespace, name, self.core.read_namespaced_config_map)
        if obj is None:
            return None
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def pvc_host_path(self, namespace: str, claim: str) -> str:
        pvc = self._get("PersistentVolumeClaim", namespace, claim,
                        self.core.read_namespaced_persistent_volume_claim)
        if pvc is None:
            raise VolumeError(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        if not volume_name:
            raise VolumeError(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self._get("PersistentVolume", "", volume_name, self.core.read_persistent_volume)
        spec = (pv or {}).get("spec") or {}
        path = (spec.get("hostPath") or {}).get("path") or (spec.get("local") or {}).get("path")
        if not path:
            raise VolumeError(f"persistentvolume {volume_name} is neither hostPath nor local; devcluster can only "
                              "mount those")
        return str(path)


def downward_value(pod: Pod, field_path: str) -> str:
    """The value of a downward API fieldPath (as the kubelet formats it)."""
    meta = pod["metadata"]
    for attr in ("labels", "annotations"):
        if field_path.startswith(f"metadata.{attr}['") and field_path.endswith("']"):
            return str((meta.get(attr) or {}).get(field_path[len(attr) + 11:-2], ""))
        if field_path == f"metadata.{attr}":
            return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get(attr) or {}).items()))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": pod["spec"].get("nodeName"),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName"),
        "status.hostIP": (pod.get("status") or {}).get("hostIP"),
        "status.podIP": (pod.get("status") or {}).get("podIP"),
    }
    if field_path not in simple:
        raise VolumeError(f"unsupported fieldPath {field_path!r}")
    return str(simple[field_path] or "")


def _select(data: dict[str, bytes], items: list[dict[str, Any]] | None, default_mode: int, what: str,
            optional: bool) -> Files:
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeError(f"{what} has no key {item['key']!r}")
        files[item["path"]] = (data[item["key"]], item.get("mode") or default_mode)
    return files


@dataclass
class _Token:
    content: bytes
    renew_at: float


class PodVolumes:
    """The volumes of one pod under ``<pod dir>/volumes``."""

    def __init__(self, api: client.ApiClient, pod: Pod, pod_dir: Path) -> None:
        self.core = client.CoreV1Api(api)
        self.pod = pod
        self.root = pod_dir / "volumes"
        self.paths: dict[str, Path] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}

    def host_path(self, volume: str) -> Path:
        return self.paths[volume]

    def sync(self, reader: SourceReader, first: bool) -> None:
        """Make (first) or refresh every volume. On the first round a missing source raises VolumeError."""
        ns = self.pod["metadata"]["namespace"]
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            try:
                if "emptyDir" in vol:
                    path = self.root / name
                    path.mkdir(parents=True, exist_ok=True)
                    self.paths[name] = path
                elif "hostPath" in vol:
                    self.paths[name] = self._host_path_volume(vol["hostPath"])
                elif "persistentVolumeClaim" in vol:
                    self.paths[name] = Path(reader.pvc_host_path(ns, vol["persistentVolumeClaim"]["claimName"]))
                else:
                    files = self._files(vol, reader)
                    self.paths[name] = self.root / name
                    write_atomically(self.root / name, files)
            except VolumeError:
                if first or name not in self.paths:
                    raise
            except client.ApiException as exc:
                if first or name not in self.paths:
                    raise VolumeError(f"volume {name}: {exc.status} {exc.reason}") from exc

    def _host_path_volume(self, spec: dict[str, Any]) -> Path:
        path = Path(spec["path"])
        kind = spec.get("type") or ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        elif kind == "Directory" and not path.is_dir():
            raise VolumeError(f"hostPath type check failed: {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise VolumeError(f"hostPath type check failed: {path} is not a file")
        return path

    def _files(self, vol: dict[str, Any], reader: SourceReader) -> Files:
        ns = self.pod["metadata"]["namespace"]
        if "secret" in vol:
            src = vol["secret"]
            data = reader.secret(ns, src["secretName"])
            if data is None:
                if src.get("optional"):
                    return {}
                raise VolumeError(f'secret "{src["secretName"]}" not found')
            return _select(data, src.get("items"), src.get("defaultMode") or DEFAULT_MODE,
                           f"secret {src['secretName']}", bool(src.get("optional")))
        if "configMap" in vol:
            src = vol["configMap"]
            data = reader.config_map(ns, src["name"])
            if data is None:
                if src.get("optional"):
                    return {}
                raise VolumeError(f'configmap "{src["name"]}" not found')
            return _select(data, src.get("items"), src.get("defaultMode") or DEFAULT_MODE,
                           f"configmap {src['name']}", bool(src.get("optional")))
        if "downwardAPI" in vol:
            src = vol["downwardAPI"]
            return self._downward(src.get("items") or [], src.get("defaultMode") or DEFAULT_MODE)
        if "projected" in vol:
            return self._projected(vol["name"], vol["projected"], reader)
        kinds = sorted(set(vol) - {"name"})
        raise VolumeError(f"volume {vol['name']}: type {', '.join(kinds)} is not supported by devcluster "
                          "(supported: secret, configMap, projected, downwardAPI, emptyDir, hostPath, "
                          "persistentVolumeClaim bound to a hostPath/local PV)")

    def _downward(self, items: list[dict[str, Any]], default_mode: int) -> Files:
        files: Files = {}
        for item in items:
            if "fieldRef" not in item:
                raise VolumeError("downwardAPI: only fieldRef items are supported by devcluster")
            value = downward_value(self.pod, item["fieldRef"]["fieldPath"])
            files[item["path"]] = (value.encode(), item.get("mode") or default_mode)
        return files

    def _projected(self, volume: str, spec: dict[str, Any], reader: SourceReader) -> Files:
        ns = self.pod["metadata"]["namespace"]
        mode = spec.get("defaultMode") or DEFAULT_MODE
        files: Files = {}
        for source in spec.get("sources") or []:
            if "secret" in source:
                src = source["secret"]
                data = reader.secret(ns, src["name"])
                if data is None and not src.get("optional"):
                    raise VolumeError(f'secret "{src["name"]}" not found')
                files.update(_select(data or {}, src.get("items"), mode, f"secret {src['name']}",
                                     bool(src.get("optional"))))
            elif "configMap" in source:
                src = source["configMap"]
                data = reader.config_map(ns, src["name"])
                if data is None and not src.get("optional"):
                    raise VolumeError(f'configmap "{src["name"]}" not found')
                files.update(_select(data or {}, src.get("items"), mode, f"configmap {src['name']}",
                                     bool(src.get("optional"))))
            elif "downwardAPI" in source:
                files.update(self._downward(source["downwardAPI"].get("items") or [], mode))
            elif "serviceAccountToken" in source:
                src = source["serviceAccountToken"]
                files[src["path"]] = (self._token(volume, src), mode)
            else:
                raise VolumeError(f"projected volume {volume}: source {', '.join(source)} is not supported")
        return files

    def _token(self, volume: str, src: dict[str, Any]) -> bytes:
        key = (volume, src["path"])
        cached = self._tokens.get(key)
        if cached and time.time() < cached.renew_at:
            return cached.content
        meta = self.pod["metadata"]
        seconds = int(src.get("expirationSeconds") or TOKEN_DEFAULT_SECONDS)
        spec: dict[str, Any] = {"expirationSeconds": seconds,
                                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                                   "uid": meta["uid"]}}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        result = self.core.create_namespaced_service_account_token(sa, meta["namespace"], {"spec": spec})
        expires = result.status.expiration_timestamp
        lifetime = seconds
        if isinstance(expires, dt.datetime):
            lifetime = max(60, int((expires - dt.datetime.now(dt.UTC)).total_seconds()))
        token = _Token(result.status.token.encode(), time.time() + 0.8 * lifetime)
        self._tokens[key] = token
        return token.content


def _current_files(target: Path) -> Files | None:
    data = target / "..data"
    if not data.is_symlink():
        return None
    files: Files = {}
    base = data.resolve()
    for path in base.rglob("*"):
        if path.is_file():
            files[str(path.relative_to(base))] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return files


def write_atomically(target: Path, files: Files) -> bool:
    """Write `files` into `target` the kubelet's AtomicWriter way; returns whether anything changed."""
    target.mkdir(parents=True, exist_ok=True)
    if _current_files(target) == files:
        return False
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    new_dir = target / stamp
    new_dir.mkdir()
    for rel, (content, mode) in files.items():
        path = new_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    data_link = target / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp_link = target / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(stamp)
    tmp_link.replace(data_link)
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            link.symlink_to(f"..data/{top}")
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.name not in tops and entry.is_symlink():
            entry.unlink()
    if old:
        shutil.rmtree(target / old, ignore_errors=True)
    return True
