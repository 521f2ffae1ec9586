"""The operator's tokens and auth ConfigMap, read by the server's own parser and verifier (docs/auth-contract.md).

The two distributions never import each other; this test imports both to hold the contract between them.
"""

import random
import time

import pytest
from deepseek_operator.auth_config import (
    TOKEN_LEEWAY_SECONDS,
    AuthDocuments,
    Limits,
    RevokeTokens,
    SetKeyLimits,
    apply_changes,
    build_auth_configmap,
    build_issuer_config,
)
from deepseek_operator.signing_keys import KeyRing, build_jwks, signing_key_from_seed
from deepseek_operator.tokens import TokenGrant, sign_token

documents = pytest.importorskip("deepseek_server.auth.documents")
server_tokens = pytest.importorskip("deepseek_server.auth.tokens")

NOW = int(time.time())
OLD = signing_key_from_seed(b"\x03" * 32, created_at=NOW - 100, sign_from=NOW - 100)
NEW = signing_key_from_seed(b"\x04" * 32, created_at=NOW - 10, sign_from=NOW + 50)


def grant(token_id: str, uid: str = "uid-1") -> TokenGrant:
    return TokenGrant(issuer="deepseek-operator/team/chat", audience="team/chat", subject="alice",
                      scopes=("model:predict",), environment="prod", apikey_uid=uid, token_id=token_id,
                      issued_at=NOW, expires_at=NOW + 24 * 3600)  # NOW is taken at import: a long suite


def server_state(docs: AuthDocuments):
    configmap = build_auth_configmap(name="chat-auth", namespace="team", labels={}, owner_references=[],
                                     documents=docs)
    return documents.parse_auth_state(
        documents.documents_from_configmap(configmap["data"], configmap.get("binaryData")))


def base_documents() -> AuthDocuments:
    return AuthDocuments(
        config=build_issuer_config(issuer="deepseek-operator/team/chat", audience="team/chat",
                                   default_limits=Limits(10, 20), generation=2),
        jwks=build_jwks(KeyRing((OLD, NEW))),
    )


def test_server_accepts_the_operators_token_and_reads_limits_and_revocations():
    docs = apply_changes(base_documents(), [SetKeyLimits("uid-1", Limits(2, 4, 1000, 1).as_document()),
                                            RevokeTokens({"gone": NOW + 3600})], now=NOW)
    state = server_state(docs)
    principal = server_tokens.verify_token(sign_token(grant("live"), OLD), state)
    assert (principal.uid, principal.subject, principal.token_id, principal.env) == ("uid-1", "alice", "live", "prod")
    assert principal.scopes == frozenset({"model:predict"})
    own, default = state.limits_for("uid-1"), state.limits_for("someone-else")
    assert (own.rps, own.burst, own.tpm, own.parallel) == (2, 4, 1000, 1)
    assert (default.rps, default.burst, default.tpm, default.parallel) == (10, 20, None, None)
    assert (state.issuer, state.audience, state.generation) == ("deepseek-operator/team/chat", "team/chat", 2)
    assert set(state.keys) == {OLD.kid, NEW.kid}
    assert "gone" in state.revoked
    with pytest.raises(server_tokens.TokenRejected):
        server_tokens.verify_token(sign_token(grant("gone"), OLD), state)


def test_a_revoked_token_stays_rejected_through_the_servers_leeway_after_expiry():
    assert TOKEN_LEEWAY_SECONDS == server_tokens.LEEWAY_SECONDS
    now = int(time.time())
    expired = TokenGrant(issuer="deepseek-operator/team/chat", audience="team/chat", subject="alice",
                         scopes=("model:predict",), environment="prod", apikey_uid="uid-1", token_id="late",
                         issued_at=now - 3600, expires_at=now - TOKEN_LEEWAY_SECONDS // 2)
    token = sign_token(expired, OLD)
    revoked = apply_changes(base_documents(), [RevokeTokens({"late": expired.expires_at})], now=now - 3600)
    # A later write of the ConfigMap (any change) prunes; the server must still reject the token.
    state = server_state(apply_changes(revoked, [SetKeyLimits("uid-2", None)], now=now))
    with pytest.raises(server_tokens.TokenRejected, match="revoked"):
        server_tokens.verify_token(token, state)


@pytest.mark.parametrize(("operator_ahead", "accepted"), [(TOKEN_LEEWAY_SECONDS - 5, True),
                                                          (TOKEN_LEEWAY_SECONDS + 15, False)])
def test_a_fresh_token_verifies_on_a_server_whose_clock_is_behind_within_the_leeway(operator_ahead, accepted):
    # `nbf` equals `iat`: the servers' leeway (on both) is the whole allowance for a server clock running behind.
    now = int(time.time())
    fresh = TokenGrant(issuer="deepseek-operator/team/chat", audience="team/chat", subject="alice",
                       scopes=("model:predict",), environment="prod", apikey_uid="uid-1", token_id="fresh",
                       issued_at=now + operator_ahead, expires_at=now + operator_ahead + 3600)
    state = server_state(base_documents())
    if accepted:
        assert server_tokens.verify_token(sign_token(fresh, OLD), state).token_id == "fresh"
    else:
        with pytest.raises(server_tokens.TokenRejected, match="not valid yet"):
            server_tokens.verify_token(sign_token(fresh, OLD), state)


def test_server_reads_the_gzip_form_of_ten_thousand_keys():
    rng = random.Random(1)
    changes = [SetKeyLimits(f"uid-{i}", Limits(1 + i % 5, 5).as_document()) for i in range(10_000)]
    changes.append(RevokeTokens({f"{rng.getrandbits(128):032x}": NOW + 3600 for _ in range(12_000)}))
    docs = apply_changes(base_documents(), changes, now=NOW)
    state = server_state(docs)
    assert len(state.limits) == 10_000 and len(state.revoked) == 12_000
    principal = server_tokens.verify_token(sign_token(grant("ok", uid="uid-7"), OLD), state)
    assert principal.uid == "uid-7"
