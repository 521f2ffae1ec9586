"""/v1/history: the caller's own recent calls (scope history:read), from the audit history."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from deepseek_server.auth.dependency import require_scope
from deepseek_server.auth.guard import SCOPE_HISTORY
from deepseek_server.auth.tokens import Principal
from deepseek_server.errors import APIError
from deepseek_server.schemas import HistoryList

router = APIRouter()


@router.get("/v1/history")
async def history(request: Request, limit: int = Query(20, ge=1, le=1000),
                  principal: Principal = Depends(require_scope(SCOPE_HISTORY))) -> HistoryList:
    """Newest first; only records of the calling key's uid (all of its rotated tokens)."""
    store = request.app.state.services.history
    try:
        records = await store.recent(principal.uid, limit)
    except Exception as exc:
        raise APIError(503, f"History is unavailable right now ({type(exc).__name__}); retry later.",
                       type="server_error", code="history_unavailable", headers={"retry-after": "1"}) from exc
    return HistoryList(data=records)
