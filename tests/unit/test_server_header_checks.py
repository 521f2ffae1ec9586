"""`RememberedCheck`: uvicorn's response-header patterns answered from a bounded table, with the pattern's answers."""

from __future__ import annotations

import random
import re

from deepseek_server.http_protocol import RememberedCheck

# uvicorn's patterns (httptools_impl.HEADER_RE, HEADER_VALUE_RE)
NAMES = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
VALUES = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


def test_every_text_gets_the_patterns_answer_the_first_time_and_every_time_after() -> None:
    rng = random.Random(7)
    alphabet = bytes(range(256))
    texts = [b"", b"x-request-id", b"bad name", b"a\r\nset-cookie: x", b"tab\tok", b"1000", b"\x7f"]
    texts += [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    texts += [bytes(rng.choice(b"abc-\t\r ") for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    for pattern in (NAMES, VALUES):
        check = RememberedCheck(pattern, size=10_000, renew=True)
        for _ in range(2):
            for text in texts:
                found, expected = check.search(text), pattern.search(text)
                assert (found is None) == (expected is None), text
                if expected is not None:
                    assert found.span() == expected.span(), text  # type: ignore[union-attr]
        assert all(pattern.search(text) is None for text in check)  # only texts it accepts are remembered


def test_a_refused_text_is_scanned_again_each_time_not_remembered() -> None:
    check = RememberedCheck(VALUES, size=8, renew=True)
    assert check.search(b"a\r\nb") is not None and check.search(b"a\r\nb") is not None
    assert len(check) == 0


def test_the_tables_stay_within_their_size() -> None:
    names = RememberedCheck(NAMES, size=4, renew=False)  # full: kept, later names scanned each time
    for index in range(10):
        assert names.search(b"x-name-%d" % index) is None
    assert sorted(names) == [b"x-name-0", b"x-name-1", b"x-name-2", b"x-name-3"]
    assert names.search(b"bad name") is not None

    values = RememberedCheck(VALUES, size=4, renew=True)  # full: emptied, and filled again by what comes next
    for index in range(10):
        assert values.search(b"%d" % index) is None
        assert len(values) <= 4
    assert b"9" in values


def test_long_texts_are_scanned_each_time_not_remembered() -> None:
    from deepseek_server.http_protocol import REMEMBERED_LENGTH

    check = RememberedCheck(VALUES, size=8, renew=True)
    long_value = b"x" * (REMEMBERED_LENGTH + 1)
    assert check.search(long_value) is None and check.search(b"x" * REMEMBERED_LENGTH) is None
    assert list(check) == [b"x" * REMEMBERED_LENGTH]
