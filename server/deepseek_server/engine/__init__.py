"""Inference engines behind one small interface: submit a request, read an async stream of text, cancel."""

from deepseek_server.engine.base import (
    Engine,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    TextDelta,
)

__all__ = ["Engine", "FinishReason", "GenerationRequest", "GenerationResult", "GenerationStream", "TextDelta"]
