"""Constrained decoding: the output must be JSON matching a schema, enforced by masking tokens at every step.

xgrammar (the structured-output backend vLLM uses) compiles the schema against the tokenizer's vocabulary once and
then, per step, gives the set of tokens that keep the output a valid prefix; the end-of-sequence token is allowed
only once the JSON is complete. The output therefore parses whenever it ends with `stop`; a `length` ending may
cut it short, as OpenAI's JSON mode does.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch

# xgrammar's messages begin with its C++ log prefix: "[10:48:47] /project/cpp/json_schema_converter.cc:5082: "
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class JsonConstraintError(ValueError):
    """The schema cannot be compiled into a grammar (the message says why)."""


def compile_failure(exc: Exception) -> str:
    """Why xgrammar refused a schema, as a client reads it: without the time and source file it logs with."""
    return _LOG_PREFIX.sub("", str(exc).strip())


class JsonGrammars:
    """Compiles schemas for one tokenizer (cached by schema text) and makes a matcher per request."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids))
        self._compiler = xgrammar.GrammarCompiler(info)
        # special tokens other than the end of sequence decode to nothing: never let them into the JSON. A tokenizer
        # can know special tokens past the model's vocabulary, which the model never produces (no logit to mask).
        self._banned = sorted(token for token in set(getattr(tokenizer, "all_special_ids", []) or []) - stop_ids
                              if token < vocab_size)
        self._compile = functools.lru_cache(maxsize=64)(self._compile_uncached)

    def _compile_uncached(self, schema: str) -> Any:
        try:
            json.loads(schema)
            # compact JSON: whitespace between tokens would only spend the token budget
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with a readable message
            raise JsonConstraintError(f"the JSON schema cannot be enforced: {compile_failure(exc)}") from exc

    def check(self, schema: str) -> None:
        """Raise JsonConstraintError when `schema` cannot be compiled."""
        self._compile(schema)

    def matcher(self, schema: str) -> JsonMatcher:
        return JsonMatcher(self, self._xgr.GrammarMatcher(self._compile(schema)))


class JsonMatcher:
    """One request's position in its grammar."""

    def __init__(self, grammars: JsonGrammars, matcher: Any) -> None:
        self._grammars = grammars
        self._matcher = matcher
        self._bitmask = grammars._xgr.allocate_token_bitmask(1, grammars.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row, [vocab]) with every token that would break the JSON set to -inf."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        masked = logits.float().unsqueeze(0).cpu()
        width = min(int(masked.shape[-1]), self._grammars.vocab_size)
        allowed = masked[:, :width]
        self._grammars._xgr.apply_token_bitmask_inplace(allowed, self._bitmask)
        if masked.shape[-1] > width:  # padding rows of the embedding past the tokenizer's vocabulary
            masked[:, width:] = float("-inf")
        banned = self._grammars._banned
        if banned and banned[-1] >= masked.shape[-1]:  # logits narrower than the configured vocabulary
            banned = [token for token in banned if token < masked.shape[-1]]
        if banned:
            masked[:, banned] = float("-inf")
        return masked.squeeze(0).to(logits.device)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} was sampled outside the JSON grammar")
