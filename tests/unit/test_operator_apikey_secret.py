import base64

from deepseek_operator.apikey_secret import build_apikey_secret, secret_token, secret_up_to_date
from deepseek_operator.names import base_url

APIKEY = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
          "metadata": {"name": "alice", "namespace": "team", "uid": "uid-1"}}


def test_secret_serves_both_our_keys_and_the_openai_client_variables():
    secret = build_apikey_secret(apikey=APIKEY, secret_name="alice-apikey", deployment="chat", token="t.o.k",
                                 base_url=base_url("team", "chat"))
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"api-key": "t.o.k", "OPENAI_API_KEY": "t.o.k",
                       "base-url": "http://chat.team.svc:8000/v1", "OPENAI_BASE_URL": "http://chat.team.svc:8000/v1"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["metadata"]["labels"]["deepseek.ai/deployment"] == "chat"
    assert secret_token(secret) == "t.o.k"
    assert secret_up_to_date(secret, secret)
    tampered = {**secret, "data": {**secret["data"], "base-url": base64.b64encode(b"http://evil").decode()}}
    assert not secret_up_to_date(tampered, secret)
    assert secret_token({"data": {"api-key": "%%%"}}) is None and secret_token(None) is None
