"""uvicorn's HTTP/1.1 protocol with its one answer of its own in OpenAI's error shape, and its check of response
headers remembered.

A request that is not valid HTTP (a control character in a header, a malformed request line, bytes after a body
shorter than its Content-Length) never reaches the app: uvicorn answers it with a plain-text 400 and closes the
connection. This protocol answers it with the same status and the same close, in the JSON shape every other error
of the server has, so a client that reads `error.message` gets one.

uvicorn's httptools protocol checks every response header's name and value with a regular expression before writing
it (a name with a separator or a control character, a value with a control character other than tab, is refused:
the response fails instead of splitting into two). A response of this server carries eight or so headers, and the
same names and most of the same values on every response (`x-ratelimit-limit-requests: 1000`, `x-cache: miss`, the
`date` of this second): the sixteen scans were about a twentieth of the server's own CPU per request on the no-op
engine. `RememberedCheck` answers a name or value seen before from a bounded table, and scans the others as before:
the same answers, the same refusals.
"""

from __future__ import annotations

import json
import re
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from deepseek_server.errors import error_body

# distinct response header names and values remembered; names are a few dozen, values repeat (limits, the cache
# state, content types, the date within its second) among ones that do not (request ids, remaining counts): the
# values' table starts again when full
REMEMBERED_NAMES = 1024
REMEMBERED_VALUES = 4096
REMEMBERED_LENGTH = 256  # longer texts are scanned each time: the tables stay small (at most about 1 MiB)

INVALID_HTTP = json.dumps(error_body(
    "The request is not valid HTTP/1.1: a malformed request line or header (a header value may not hold control "
    "characters), or a body that does not match its Content-Length.", "invalid_request_error",
    code="invalid_http_request")).encode()


class OpenAIErrorsHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's own protocol (httptools where installed, else h11), its 400 for a request it cannot parse in JSON."""

    def send_400_response(self, msg: str) -> None:
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:  # `date`, and the server's configured headers
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(INVALID_HTTP))
        self.transport.write(b"".join(head) + INVALID_HTTP)
        self.transport.close()


class RememberedCheck(dict[bytes, Any]):
    """`pattern.search(text)` for header bytes, remembered: `check.search(text)` is None for a text the pattern does
    not match, as the pattern says, and the pattern's match where it does (not remembered: refused headers are rare,
    and each is scanned again). Holds at most `size` texts of at most REMEMBERED_LENGTH bytes; a full table is
    emptied (`renew`) or kept as it is. Texts are `bytes`, as ASGI has header names and values: a `bytearray` (which
    the pattern alone would scan) cannot be looked up, and raises TypeError."""

    __slots__ = ("pattern", "renew", "size")

    def __init__(self, pattern: re.Pattern[bytes], size: int, renew: bool) -> None:
        super().__init__()
        self.pattern, self.size, self.renew = pattern, size, renew

    search = dict.__getitem__  # C-level on a hit: the table's lookup is the check

    def __missing__(self, text: bytes) -> re.Match[bytes] | None:
        found = self.pattern.search(text)
        if found is None and len(text) <= REMEMBERED_LENGTH:
            if len(self) >= self.size:
                if not self.renew:
                    return None
                self.clear()
            self[text] = None
        return found


def remember_header_checks() -> bool:
    """Put `RememberedCheck`s in place of the patterns uvicorn's httptools protocol checks response headers with
    (module globals it reads on each response); once. False where that protocol is not the one in use (no httptools:
    h11 checks headers its own way) or has no such patterns."""
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # no httptools: uvicorn runs h11
        return False
    if AutoHTTPProtocol is not httptools_impl.HttpToolsProtocol:
        return False
    names, values = getattr(httptools_impl, "HEADER_RE", None), getattr(httptools_impl, "HEADER_VALUE_RE", None)
    if isinstance(names, RememberedCheck) and isinstance(values, RememberedCheck):
        return True
    if not isinstance(names, re.Pattern) or not isinstance(values, re.Pattern):
        return False
    httptools_impl.HEADER_RE = RememberedCheck(names, REMEMBERED_NAMES, renew=False)
    httptools_impl.HEADER_VALUE_RE = RememberedCheck(values, REMEMBERED_VALUES, renew=True)
    return True


remember_header_checks()
