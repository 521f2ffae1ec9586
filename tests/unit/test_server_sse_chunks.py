"""Streamed text chunks built from JSON encoded once per stream are byte for byte the events of `sse(chunk(...))`."""

from __future__ import annotations

import pytest
from deepseek_server.response_bodies import TextChunks, chunk, sse

TEXTS = ["hi", " ok", "你好", "\u2028line\u2029", 'quote " backslash \\ newline \n', "", "a" * 300, "😀",
         "\x00\x1f\x7f"]


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("with_usage", [False, True])
@pytest.mark.parametrize("model", ["deepseek-tiny", 'odd "model" ü/1'])
def test_text_chunk_events_equal_the_generic_encoding(kind: str, with_usage: bool, model: str) -> None:
    call_id = "chatcmpl-0123456789abcdef"
    chunks = TextChunks(kind, call_id, 1_767_225_600, model, with_usage)  # type: ignore[arg-type]
    for index in (0, 1, 12):
        for text in TEXTS:
            assert chunks.event(index, text) == sse(chunk(kind, call_id, 1_767_225_600, model, index,  # type: ignore[arg-type]
                                                          text=text, with_usage_field=with_usage))
