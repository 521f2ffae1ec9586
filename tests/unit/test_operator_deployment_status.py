from deepseek_operator.apikey_plan import IssuerView, apikey_conditions
from deepseek_operator.auth_config import Limits
from deepseek_operator.deployment_status import issuer_status


def _condition(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_the_deployment_says_when_its_auth_configmap_has_no_room_for_new_keys():
    status = issuer_status({}, ready=True, reason="SigningKeyPublished", message="", signing_key_id="k",
                           auth_configmap="chat-auth", generation=1, now="T", auth_config_size=900 * 1024)
    full = _condition(status, "AuthConfigFull")
    assert full["status"] == "True" and full["reason"] == "NewKeysWait"
    assert "900 KiB" in full["message"] and "delete unused ApiKeys" in full["message"]
    roomy = issuer_status({}, ready=True, reason="SigningKeyPublished", message="", signing_key_id="k",
                          auth_configmap="chat-auth", generation=1, now="T", auth_config_size=10 * 1024)
    assert _condition(roomy, "AuthConfigFull")["status"] == "False"


def test_a_new_key_waiting_for_room_says_so():
    apikey = {"metadata": {"namespace": "ns", "name": "alice"}, "spec": {"deploymentRef": {"name": "chat"}}}
    issuer = IssuerView(deployment="chat", issuer="i", audience="a", base_url="u", signing_key=None,
                        published_kids=frozenset(), default_scopes=(), default_limits=Limits(10, 20),
                        limits_entry=None)
    ready = apikey_conditions(apikey, {}, issuer, now=0, deployment="chat",
                              auth_config_full="ConfigMap ns/chat-auth holds 900 KiB")[0]
    assert (ready.status, ready.reason) == (False, "AuthConfigFull") and "900 KiB" in ready.message
