"""Pure parts of devcluster: certificates, address ranges, node objects, build stamps."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devcluster import agent, build, cluster, network, pki

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_client_certificate_carries_user_and_groups_and_chains_to_ca():
    ca = pki.make_ca("test-ca", NOW)
    leaf = pki.issue_cert(ca, "alice", NOW, organizations=("system:masters",))
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    assert cert.issuer == ca_cert.subject
    pub = ca_cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_serving_certificate_names_every_address():
    ca = pki.make_ca("test-ca", NOW)
    leaf = pki.issue_cert(ca, "kube-apiserver", NOW, server=True, dns_names=("kubernetes",),
                          ip_addresses=("127.0.0.1", "10.240.0.1"))
    sans = x509.load_pem_x509_certificate(leaf.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["kubernetes"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.240.0.1"]


def test_pod_cidr_avoids_networks_in_use():
    used = [ipaddress.ip_network("10.240.0.0/16"), ipaddress.ip_network("10.0.0.0/8")]
    # 10.0.0.0/8 overlaps every candidate: nothing is free.
    try:
        network.pick_pod_cidr(used)
    except network.NetworkError as exc:
        assert "no free /16" in str(exc)
    else:
        raise AssertionError("expected NetworkError")
    assert network.pick_pod_cidr([ipaddress.ip_network("10.240.0.0/16")]) == ipaddress.ip_network("10.241.0.0/16")


def test_pod_addresses_skip_gateway_and_are_not_loopback():
    net = network.PodNetwork("dc-x", ipaddress.ip_network("10.241.0.0/16"))
    assert net.gateway == "10.241.0.1"
    assert net.pod_ip(1) == "10.241.0.2"
    assert not ipaddress.ip_address(net.pod_ip(300)).is_loopback
    assert len(network.bridge_name("a-very-long-cluster-name" * 3)) <= 15


def test_node_object_advertises_gpus_and_product():
    node = agent.build_node("gpu-node-1", 8, "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu", "10.241.0.1")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    ready = next(c for c in agent.node_conditions("t1", "t0") if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["lastHeartbeatTime"] == "t1"


def test_image_mapping_uses_globs():
    pod = {"spec": {"containers": [{"name": "c", "image": "ghcr.io/acme/deepseek-server:1.0"}]}}
    assert agent.image_matches(pod, {"*deepseek-server*": ["x"]})
    assert not agent.image_matches(pod, {"*other*": ["x"]})


def test_kubernetes_binaries_are_stamped_with_their_version():
    flags = " ".join(build._kube_ldflags())
    assert f"k8s.io/component-base/version.gitVersion={build.KUBERNETES_VERSION}" in flags
    assert "k8s.io/client-go/pkg/version.gitVersion" in flags
    names = {b.name for b in build.BINARIES}
    assert names == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "helm"}


def test_apply_waits_only_while_a_new_kind_is_not_served_yet():
    assert cluster.not_served_yet('error: resource mapping not found for name: "tiny" namespace: "demo" from "STDIN": '
                                  'no matches for kind "DeepSeekDeployment" in version "deepseek.ai/v1alpha1"\n'
                                  'ensure CRDs are installed first')
    assert cluster.not_served_yet("Error from server (ServiceUnavailable): error when retrieving current configuration"
                                  " of: ...: the server is currently unable to handle the request")
    # the API server's own answer in the first moments after the CRD is Established
    assert cluster.not_served_yet('Error from server (ServiceUnavailable): error when creating "STDIN": Resource kind '
                                  'deepseek.ai/v1alpha1, Kind=ApiKey not found. There can be a delay between when '
                                  'CustomResourceDefinitions are created and when they are available.')
    assert not cluster.not_served_yet('The DeepSeekDeployment "tiny" is invalid: spec.replicas: Invalid value: -1: '
                                      'spec.replicas in body should be greater than or equal to 0')
    assert not cluster.not_served_yet('Error from server (Forbidden): namespaces "demo" is forbidden')


def test_a_failed_kubectl_says_what_kubectl_printed():
    failed = cluster.KubectlError(1, ["kubectl", "apply", "-f", "-"], "", 'Error from server (NotFound): '
                                  'namespaces "demo" not found\n')
    assert str(failed).endswith('exit status 1.: Error from server (NotFound): namespaces "demo" not found')
    assert isinstance(failed, subprocess.CalledProcessError)
    assert str(cluster.KubectlError(1, ["kubectl"], "", "")) == str(subprocess.CalledProcessError(1, ["kubectl"]))


class ScriptedKubectl:
    """A kubectl stand-in that answers each call with the next (returncode, stderr) and records the arguments."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers, self.calls = list(answers), []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        code, stderr = self.answers.pop(0)
        return subprocess.CompletedProcess(["kubectl", *args], code, "", stderr)


NO_CONDITIONS = "error: .status.conditions accessor error: <nil> is of the type <nil>, expected []interface{}\n"


def test_waiting_for_a_crd_tries_again_while_it_has_no_conditions_yet():
    """`kubectl wait` fails at once on a CRD just stored, before it has conditions: that is worth another wait."""
    kubectl = ScriptedKubectl((1, NO_CONDITIONS), (1, NO_CONDITIONS), (0, ""))
    cluster.wait_established(kubectl, ["apikeys.deepseek.ai", "deepseekdeployments.deepseek.ai"], timeout=30)
    assert len(kubectl.calls) == 3
    assert kubectl.calls[0][:2] == ("wait", "--for=condition=Established")
    assert kubectl.calls[0][-2:] == ("crd/apikeys.deepseek.ai", "crd/deepseekdeployments.deepseek.ai")


def test_waiting_for_a_crd_fails_at_once_on_anything_else():
    kubectl = ScriptedKubectl((1, "error: timed out waiting for the condition on customresourcedefinitions/x\n"))
    with pytest.raises(cluster.KubectlError, match="timed out waiting"):
        cluster.wait_established(kubectl, ["x.example.com"], timeout=30)
    assert len(kubectl.calls) == 1
    kubectl = ScriptedKubectl(*[(1, NO_CONDITIONS)] * 100)
    with pytest.raises(cluster.KubectlError, match="accessor error"):  # and on conditions that never come, at last
        cluster.wait_established(kubectl, ["x.example.com"], timeout=0.5)


@pytest.mark.parametrize("image", ["local/deepseek-operator:dev", "local/deepseek-server:dev",
                                   "local/deepseek-server-flaky:dev"])
def test_our_images_run_this_checkouts_source(image):
    # The virtual environment's editable installs may point at another checkout (a git worktree beside the main one):
    # pods get no PYTHONPATH from this machine, so the mapping puts this checkout's source first.
    from devcluster.processes import image_command

    argv = image_command(image, cluster.default_image_commands())
    assert argv is not None and argv[0] == "env"
    root = Path(cluster.__file__).resolve().parent.parent
    package = "operator" if "operator" in image else "server"
    assert argv[1].startswith(f"PYTHONPATH={root / package}")


def test_an_image_glob_of_ones_own_wins_over_a_built_in_one_that_matches_the_same_image():
    from devcluster.processes import image_command

    commands = cluster.with_own_images(cluster.default_image_commands(),
                                       {"*deepseek-server-dev*": ["/usr/bin/my-server"],
                                        "*deepseek-operator*": ["/usr/bin/my-operator"]})
    assert image_command("local/deepseek-server-dev:1", commands) == ["/usr/bin/my-server"]
    assert image_command("local/deepseek-operator:1", commands) == ["/usr/bin/my-operator"]
    assert image_command("local/deepseek-server:1", commands)[0] == "env"  # the built-in ones still apply
