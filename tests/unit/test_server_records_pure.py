"""Pure pieces of what the server records: masking of prompt text, keyed request digests, token reservations."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from deepseek_server.limits.memory_store import MemoryLimitStore
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.redaction import CATEGORIES, Redactor, luhn_valid, parse_categories
from deepseek_server.request_keys import RequestKeys

ALL = Redactor.from_setting("all")


@pytest.mark.parametrize(("text", "category"), [
    ("write to bob.smith+tag@mail.example.co.uk today", "email"),
    ("Authorization: Bearer abc.DEF-123_456~xyz sent", "api_key"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nature-1 here", "api_key"),
    ("key sk-abcdefghijklmnop1234 here", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "api_key"),
    ("password = hunter2hunter2 set", "api_key"),
    # a secret's name inside a longer one, and a password in a URL
    ("use access_token=abcdef123456 now", "api_key"),
    ("config client_secret: abcdefghijk here", "api_key"),
    ("env REDIS_PASSWORD=supersecret1 set", "api_key"),
    ("env DEEPSEEK_RECORD_KEY=Zm9vYmFyYmF6 set", "api_key"),
    ("url redis://:hunter2secret@redis:6379/0 used", "api_key"),
    ("url https://bob:pa55word@host/x used", "api_key"),
    ("NI number ab123456c here", "national_id"),
    ("card 4111 1111 1111 1111 please", "card"),
    ("card 5500-0000-0000-0004 please", "card"),
    ("ssn 078-05-1120 here", "national_id"),
    ("NI number AB 12 34 56 C here", "national_id"),
    ("call +44 20 7946 0958 now", "phone"),
    ("call (415) 555-0132 now", "phone"),
    ("call 415-555-0132 now", "phone"),
    ("call 020 7946 0958 now", "phone"),
])
def test_each_category_is_masked(text: str, category: str) -> None:
    masked = ALL.mask(text)
    assert f"[redacted:{category}]" in masked, masked
    assert masked.split()[0] == text.split()[0] and masked.split()[-1] == text.split()[-1]  # the rest stays


@pytest.mark.parametrize("text", [
    "order 4111 1111 1111 1112 shipped",  # fails the Luhn check: not a card
    "released on 2024-01-15 at 10:30",
    "version 1.2.3 costs 42 dollars, ticket 12345",
    "invalid ssn 000-12-3456 and 666-12-3456",
    "the password is fine, see https://example.com/a@b and monkey=banana12345",
])
def test_ordinary_numbers_are_kept(text: str) -> None:
    assert ALL.mask(text) == text


def test_categories_are_configurable() -> None:
    assert parse_categories("all") == frozenset(CATEGORIES) and parse_categories("none") == frozenset()
    only_email = Redactor.from_setting("email")
    assert only_email.mask("a@b.io 4111111111111111") == "[redacted:email] 4111111111111111"
    assert Redactor.from_setting("none").mask("a@b.io") == "a@b.io"
    with pytest.raises(ValueError, match="unknown redaction categories"):
        parse_categories("email,passport")


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_preview_masks_across_the_cut_and_drops_a_cut_word() -> None:
    text = "x" * 195 + " sk-abcdefghijklmnopqrstuvwx rest"
    preview = ALL.preview(text, 200)
    assert preview == "x" * 195  # the key crossed the cut: masked whole, then the cut placeholder dropped
    assert "sk-" not in preview
    assert ALL.preview("short a@b.io", 200) == "short [redacted:email]"
    assert ALL.preview("line one\nline-two\n" + "x" * 300, 200) == "line one\nline-two"  # any whitespace
    # text without whitespace (Chinese, Japanese) has no words to keep whole: cut as it is (it was empty)
    assert ALL.preview("中文" * 300, 200) == "中文" * 100


@pytest.mark.parametrize(("secret", "fragment"), [("alice.smith@example.com", "alice"),
                                                  ("sk-proj-ABCDEFGHIJKLMNOPQRSTUV", "sk-proj"),
                                                  ("4111 1111 1111 1111", "4111")])
def test_preview_drops_what_the_masking_window_cut_where_masking_shortened_it(secret: str, fragment: str) -> None:
    """Masking runs over the first `limit + 1024` characters. Where it shortens them to `limit` or fewer (a long
    masked token), what the window's end cut in two no longer matches its pattern: it must not be kept."""
    head = "Authorization: Bearer " + "A" * 1150 + " then "
    head += " " * (200 + 1024 - 10 - len(head))  # the window ends 10 characters into the secret
    preview = ALL.preview(head + secret + " and more", 200)
    assert fragment not in preview, preview


def test_request_keys_separate_deployments_revisions_environments_and_callers() -> None:
    keys = RequestKeys(b"s" * 32, "team/chat", "rev1")
    base = keys.cache_key("digest", "dev", "key:u1")
    assert base == RequestKeys(b"s" * 32, "team/chat", "rev1").cache_key("digest", "dev", "key:u1")
    others = {
        RequestKeys(b"s" * 32, "team/other", "rev1").cache_key("digest", "dev", "key:u1"),
        RequestKeys(b"s" * 32, "team/chat", "rev2").cache_key("digest", "dev", "key:u1"),
        RequestKeys(b"t" * 32, "team/chat", "rev1").cache_key("digest", "dev", "key:u1"),
        keys.cache_key("digest", "prod", "key:u1"),
        keys.cache_key("digest", "dev", "key:u2"),
        keys.cache_key("other", "dev", "key:u1"),
        keys.request_fingerprint("digest", {}),
    }
    assert base not in others and len(others) == 7
    # length-prefixed parts: moving a boundary between parts changes the key
    assert RequestKeys(b"s" * 32, "a", "bc").cache_key("d", "e", "f") != RequestKeys(
        b"s" * 32, "ab", "c").cache_key("d", "e", "f")


def test_memory_tokens_are_reserved_at_admission_and_refunded_at_release() -> None:
    now = [100.0]
    store = MemoryLimitStore(clock=lambda: now[0])
    limits = KeyLimits(rps=1000, burst=1000, tpm=60)  # one token per second
    first = store.acquire("u", limits, reserve_tokens=50)
    assert first.allowed and first.remaining_tokens == 10
    second = store.acquire("u", limits, reserve_tokens=50)  # 10 tokens free: admitted, overshoots once
    assert second.allowed
    third = store.acquire("u", limits, reserve_tokens=1)
    assert not third.allowed and third.kind == "tokens"
    store.release("u", limits, tokens_used=5, reserved=50)  # refunds 45
    store.release("u", limits, tokens_used=5, reserved=50)
    fourth = store.acquire("u", limits, reserve_tokens=0)
    assert fourth.allowed and fourth.remaining_tokens == 50
    store.release("u", limits, tokens_used=70, reserved=0)  # used more than reserved: charged
    assert not store.acquire("u", limits).allowed


def test_an_answer_given_at_once_counts_as_a_request_but_holds_no_parallel_slot() -> None:
    store = MemoryLimitStore(clock=lambda: 100.0)
    limits = KeyLimits(rps=1, burst=3, parallel=1)
    assert store.acquire("u", limits, hold=False).allowed  # a cache hit: nothing to release
    running = store.acquire("u", limits)
    assert running.allowed and running.remaining_requests == 1  # the hit used one of the burst of 3
    refused = store.acquire("u", limits, hold=False)
    assert not refused.allowed and refused.kind == "parallel"


@pytest.mark.parametrize("secret", [b"", b"k", b"r" * 32, b"s" * 64, b"long-record-key-" * 8])
def test_request_digests_are_hmac_sha256_of_the_length_prefixed_parts(secret: bytes) -> None:
    keys = RequestKeys(secret, deployment="chat", revision="rev-1")
    message = b"5:cache4:chat5:rev-13:dev13:model:predict3:xyz"
    assert keys.cache_key("xyz", "dev", "model:predict") == hmac.new(secret, message, hashlib.sha256).hexdigest()
    bodies = [{}, {"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 1.0},
              {"prompt": [[1, 2], [3]], "logit_bias": {"50256": -100}, "stop": ["\n", "é"], "n": 2},
              {"messages": [{"role": "user", "content": "Zoë — quote \" backslash \\ ✓ 😀"}], "top_p": 0.25}]
    for body in bodies:  # the request's fingerprint: the request as sorted JSON after the first part
        canonical = json.dumps({"route": "chat", "body": body}, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        fingerprint = keys.request_fingerprint("chat", {**body, "stream": True, "user": "someone"})
        assert fingerprint == hmac.new(secret, f"11:fingerprint{canonical}".encode(), hashlib.sha256).hexdigest()
        assert fingerprint == keys.request_fingerprint("chat", body)  # the key's states are not consumed
        assert fingerprint != hashlib.sha256(canonical.encode()).hexdigest()


def test_a_request_orjson_cannot_write_gets_the_standard_librarys_fingerprint() -> None:
    keys = RequestKeys(b"k" * 32)
    body = {"prompt": "hi", "seed": 2**70}  # beyond 64 bits: orjson refuses it
    canonical = json.dumps({"route": "text", "body": body}, sort_keys=True, separators=(",", ":"))
    assert keys.request_fingerprint("text", body) == hmac.new(b"k" * 32, f"11:fingerprint{canonical}".encode(),
                                                              hashlib.sha256).hexdigest()
    assert keys.request_fingerprint("text", body) != keys.request_fingerprint("text", {**body, "seed": 2**70 + 1})


def test_a_preview_masks_a_bounded_window_whatever_the_prompt() -> None:
    """A long secret at the head shrinks when masked, and the window grows to keep a fragment out of the preview;
    it stops at WINDOW_MOST characters past the cut, so a prompt of a megabyte is not masked whole."""
    from deepseek_server.redaction import WINDOW_MOST

    masked_lengths: list[int] = []

    class Recording(Redactor):
        def mask(self, text: str) -> str:
            masked_lengths.append(len(text))
            return super().mask(text)

    recording = Recording(ALL.categories)
    preview = recording.preview("token=" + "x" * 20_000 + " " + "a-" * 200_000, 200)
    assert max(masked_lengths) <= 200 + WINDOW_MOST and "xxxx" not in preview

