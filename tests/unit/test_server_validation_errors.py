"""Which of pydantic's errors a 400 reports: the one that says what to change."""

from __future__ import annotations

from typing import Any

import pytest
from deepseek_server.errors import most_telling


def error(kind: str, *loc: Any, msg: str = "") -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


@pytest.mark.parametrize(("errors", "reported"), [
    # a list where a string or a list is allowed: the list's rule, not the string form's mismatch
    ([error("string_type", "stop", "str"), error("too_long", "stop", "list[str]")], 1),
    # inside the list's items: the item's broken rule
    ([error("string_type", "messages", 0, "content", "str"),
      error("literal_error", "messages", 0, "content", "list[TextContentPart]", 0, "type"),
      error("missing", "messages", 0, "content", "list[TextContentPart]", 0, "text")], 1),
    # the value fits no form by its kind (a number): the first form's mismatch
    ([error("string_type", "content", "str"), error("list_type", "content", "list[TextContentPart]")], 0),
    # not a choice between forms: the first error, whatever follows
    ([error("int_type", "max_tokens"), error("too_long", "stop", "list[str]")], 0),
    # a rule broken in another field does not stand for this field's mismatch
    ([error("string_type", "prompt", "str"), error("list_type", "prompt", "list[str]"),
      error("greater_than_equal", "max_tokens")], 0),
    ([error("too_long", "stop", "list[str]"), error("string_type", "stop", "str")], 0),
])
def test_the_reported_error_is_the_broken_rule_of_the_form_the_value_has(errors: list[dict[str, Any]],
                                                                         reported: int) -> None:
    assert most_telling(errors) is errors[reported]
