"""uvicorn's HTTP/1.1 protocol with its one answer of its own in OpenAI's error shape.

A request that is not valid HTTP (a control character in a header, a malformed request line, bytes after a body
shorter than its Content-Length) never reaches the app: uvicorn answers it with a plain-text 400 and closes the
connection. This protocol answers it with the same status and the same close, in the JSON shape every other error
of the server has, so a client that reads `error.message` gets one.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from deepseek_server.errors import error_body

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
