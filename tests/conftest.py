"""Shared fixtures: one real control plane per test session, a fresh namespace per test, a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.testing.ports import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server (Debian's package) on a free loopback port, for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `apt-get install redis-server` (.ci/run does)")
    workdir = tempfile.mkdtemp(prefix="redis-")
    for _attempt in range(5):  # a port chosen before redis binds it can be taken meanwhile: then another port
        port = free_port()
        proc = subprocess.Popen(
            # Bound to all addresses so that pods in devcluster's network namespaces reach it through the bridge
            # gateway; this machine's network is closed, and protected mode is off only for that reason.
            [binary, "--port", str(port), "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            if proc.poll() is not None:
                continue  # exited: most likely the port was taken
            proc.kill()
            pytest.fail(f"redis-server did not answer on port {port} within 60 s")
        break
    else:
        pytest.fail("redis-server exited at start five times (ports taken?)")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    """The devcluster control plane (etcd, kube-apiserver, controller-manager, scheduler, GPU nodes)."""
    from devcluster import DevCluster

    with DevCluster.from_env() as running:
        yield running


@pytest.fixture(scope="session")
def kubeconfig(cluster) -> str:
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    return str(cluster.kubeconfig)


@pytest.fixture(scope="session")
def api_client(cluster):
    """A kubernetes.client.ApiClient talking to the devcluster API server."""
    return cluster.api_client()


@pytest.fixture
def namespace(cluster, api_client) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except client.ApiException as exc:
        if exc.status != 404:
            raise


# The whole suite's process ends without the interpreter's own shutdown once pytest has reported: after every test
# passed, one run here died of a segmentation fault during that shutdown (native threads the server tests leave,
# torch's among them, being torn down), which turned a passing run into a failing exit status. The status pytest
# decided is the one the process exits with.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
