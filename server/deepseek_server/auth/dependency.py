"""FastAPI dependencies that authenticate a request and require a scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from deepseek_server.auth.tokens import Principal


def authorization_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first `Authorization` header of a request's ASGI headers (names are lower case there), as
    `request.headers.get("authorization")` reads it, without building and searching Starlette's header mapping."""
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def require_scope(scope: str | None) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency returning the caller's Principal; `scope=None` accepts any valid key."""

    async def authenticated(request: Request) -> Principal:
        services = request.app.state.services
        authorization = authorization_header(request.scope["headers"])
        principal: Principal = services.authenticator.authenticate(authorization, scope)
        request.state.principal = principal
        return principal

    return authenticated
