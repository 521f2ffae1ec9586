"""FastAPI dependencies that authenticate a request and require a scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from deepseek_server.auth.tokens import Principal


def require_scope(scope: str | None) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency returning the caller's Principal; `scope=None` accepts any valid key."""

    async def authenticated(request: Request) -> Principal:
        services = request.app.state.services
        principal: Principal = services.authenticator.authenticate(request.headers.get("authorization"), scope)
        request.state.principal = principal
        return principal

    return authenticated
