"""Mask secrets and personal data in prompt text before it is recorded (audit log, history).

Each category is a set of patterns; a match is replaced by `[redacted:<category>]`. The patterns are heuristics that
err towards masking: card numbers only when the Luhn checksum holds (so order numbers and timestamps survive),
phone numbers only in the usual written forms (international `+…`, `(555) 123-4567`, `555-123-4567`, trunk-prefixed
`020 7946 0958`), national ids in their official formats (US SSN `123-45-6789`, UK NI `AB 12 34 56 C`, any case).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

CATEGORIES = ("api_key", "email", "phone", "card", "national_id")
_LAST_SPACE = re.compile(r"\s(?=\S*$)")  # the last whitespace of a text
WINDOW_MARGIN = 64  # masked characters past a preview's cut: more than any pattern of several words spans
WINDOW_MOST = 4096  # characters past a preview's cut that are masked at most (a few hundredths of a second)

_API_KEY = [
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}(?:\.[A-Za-z0-9_-]*){0,2}"),  # JWT, also when cut short
    re.compile(r"\bsk-[A-Za-z0-9_-]{12,}"),  # OpenAI-style (sk-..., sk-proj-...)
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"),
    # `name: value` / `name=value` for a secret's name, also at the end of a longer one (`access_token`,
    # `client_secret`, `REDIS_PASSWORD`, `DEEPSEEK_RECORD_KEY`). The match starts at the name's last part: a pattern
    # for the whole name (`\b[\w-]*...`) tries every position of a long run of word characters again (quadratic)
    re.compile(r"(?i)(?:(?:api|access|secret|private|record)[_-]?key|secret|token|password|passwd)\b"
               r"(\s*[:=]\s*)[\"']?[^\s\"']{6,}"),
    # a password in a URL (`redis://:pw@host`, `https://user:pw@host`), found from its `://`
    re.compile(r"(://[^\s:/@]*:)[^\s/@]+(?=@)"),
]
_EMAIL = [re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")]
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_NATIONAL_ID = [
    re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}[- ](?!00)\d{2}[- ](?!0000)\d{4}(?![\d-])"),  # US SSN
    re.compile(r"(?i)\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),  # UK National Insurance
]
_PHONE = [
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"),
    re.compile(r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"),
    re.compile(r"(?<![\w+])0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4}(?!\w)"),
]


def luhn_valid(digits: str) -> bool:
    """The card-number checksum (ISO/IEC 7812)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def parse_categories(text: str) -> frozenset[str]:
    """`'email,card'` -> those categories; `'all'` and `'none'` as said. Unknown names are an error."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if names == {"none"}:
        return frozenset()
    if names == {"all"}:
        return frozenset(CATEGORIES)
    unknown = sorted(names - set(CATEGORIES))
    if unknown or not names:
        raise ValueError(f"unknown redaction categories {unknown or [text]}: use a comma list of "
                         f"{', '.join(CATEGORIES)}, or 'all' or 'none'")
    return frozenset(names)


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[redacted:card]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group(0))
    return "[redacted:phone]" if 7 <= digits <= 15 else match.group(0)


def _key(match: re.Match[str]) -> str:
    if match.lastindex:  # `password: value` keeps its name, loses its value
        return match.group(0)[:match.end(1) - match.start(0)] + "[redacted:api_key]"
    return "[redacted:api_key]"


@dataclass(frozen=True)
class Redactor:
    """Masks the configured categories; cards and national ids go before phone numbers (they look alike)."""

    categories: frozenset[str]

    @classmethod
    def from_setting(cls, text: str) -> Redactor:
        return cls(parse_categories(text))

    @cached_property
    def _steps(self) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str]]:
        steps: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str]] = []
        if "api_key" in self.categories:
            steps += [(p, _key) for p in _API_KEY]
        if "email" in self.categories:
            steps += [(p, "[redacted:email]") for p in _EMAIL]
        if "card" in self.categories:
            steps.append((_CARD, _card))
        if "national_id" in self.categories:
            steps += [(p, "[redacted:national_id]") for p in _NATIONAL_ID]
        if "phone" in self.categories:
            steps += [(p, _phone) for p in _PHONE]
        return steps

    def mask(self, text: str) -> str:
        for pattern, replacement in self._steps:
            text = pattern.sub(replacement, text)
        return text

    def preview(self, text: str, limit: int) -> str:
        """The first `limit` characters of `text`, masked. Masking runs over a wider window first, so a secret that
        crosses the cut is still recognised whole; a word cut in two at the end is dropped, back to the last
        whitespace. Text without whitespace (Chinese, Japanese) is cut as it is: it has no words to keep whole."""
        end, most = limit + 1024, limit + WINDOW_MOST
        while True:
            window = text[:end]
            masked = self.mask(window)
            # the window's end well past the cut: a pattern it splits (a card number's digits, a phone number) ends
            # after the cut, not inside what is kept; where masking shortened it that much, the window grows, up to
            # WINDOW_MOST (some patterns take time growing with the square of a long run of their characters)
            if len(window) == len(text) or len(masked) > limit + WINDOW_MARGIN or end >= most:
                break
            end = min(end * 2, most)
        if len(masked) <= limit and len(window) == len(text):
            return masked
        cut = masked[:limit]
        after = masked[limit] if len(masked) > limit else text[len(window)]  # what follows the cut
        if not after.isspace() and cut and not cut[-1].isspace():
            last = _LAST_SPACE.search(cut)
            if last is not None:
                cut = cut[:last.start()]
        return cut
