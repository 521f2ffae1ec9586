"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek_server.schemas import LONE_SURROGATE

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client sees: raise it anywhere below a route and it is rendered as OpenAI does."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an OpenAI error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# request.state's: the rate-limit headers the limiter's admission made for the request (`generation.admit`)
ADMISSION_HEADERS = "ratelimit_headers"


def admission_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The `x-ratelimit-*` headers (as ASGI sends them) of the request's rate-limit admission; none before it."""
    headers: list[tuple[bytes, bytes]] = request.scope.get("state", {}).get(ADMISSION_HEADERS) or []
    return headers


def error_response(exc: APIError, request: Request | None = None) -> JSONResponse:
    """`exc` as OpenAI's error body. With `request`: as OpenAI does, an error after the request was admitted by the
    rate limiter (503 engine busy, 500, a relayed engine's 4xx, 499) carries the same `x-ratelimit-*` headers as a
    200; a header `exc` sets itself (a 429's own, `retry-after`) is not repeated."""
    response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    admitted = admission_headers(request) if request is not None else None
    if admitted:
        own = {name for name, _ in response.raw_headers}
        response.raw_headers += [header for header in admitted if header[0] not in own]
    return response


def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The 500 for an exception nothing below the route caught: logged with its traceback, answered without it."""
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    request.state.error_code = "internal_error"
    return error_response(APIError(500, "The server had an error while processing your request.",
                                   type="server_error"), request)


_UNION_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-\w+)$|[\[\]]")


def _param_of(location: tuple[Any, ...]) -> str | None:
    """`('body', 'messages', 0, 'role')` -> `messages[0].role`, dropping pydantic's union-member tags."""
    parts = [str(p) for p in location
             if p not in ("body", "query") and not (isinstance(p, str) and _UNION_TAGS.search(p))]
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _wrong_kind(error: Mapping[str, Any]) -> bool:
    """A value of the wrong kind (`string_type`, `list_type`, `int_parsing`...), as opposed to a value of the right kind
    that breaks a rule (too long, not one of the allowed values, a field missing)."""
    kind = str(error.get("type", ""))
    return kind.endswith(("_type", "_parsing"))


def most_telling(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The error to report of those pydantic found. For a field that takes one of several forms (`stop`: a string or
    a list of strings), pydantic reports why the value fits none of them, the first form first: a list of five stop
    sequences fails as "Input should be a valid string" before "List should have at most 4 items". What tells the
    caller what to change is the failure of the form whose kind the value has, so a rule broken inside the same field
    wins over the first form's mismatch of kind."""
    first = errors[0]
    if not _wrong_kind(first):
        return first
    location = tuple(first.get("loc", ()))
    if location and isinstance(location[-1], str) and _UNION_TAGS.search(location[-1]):
        field = location[:-1]  # the field itself, without the tag of the form that failed
        for other in errors[1:]:
            if tuple(other.get("loc", ()))[:len(field)] == field and not _wrong_kind(other):
                return other
    return first


def validation_error(exc: RequestValidationError) -> APIError:
    """Map a pydantic validation failure to OpenAI's 400 invalid_request_error, naming the parameter."""
    errors = exc.errors()
    first = most_telling(errors) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({first.get('msg', 'invalid JSON')}).",
            code="invalid_json",
        )
    if first.get("type") == LONE_SURROGATE:  # found by walking the body: the context names the parameter
        param = (first.get("ctx") or {}).get("param")
        reason = str(first.get("msg"))
        message = f"Invalid value for '{param}': {reason}." if param else f"Invalid request body: {reason}."
        return APIError(400, message, param=param, code="invalid_value")
    param = _param_of(tuple(first.get("loc", ())))
    if param is None and first.get("type") == "missing":  # the body itself: nothing was sent
        return APIError(400, "We could not parse the JSON body of your request: the request has no body. Send a "
                        "JSON object with 'Content-Type: application/json'.", code="invalid_json")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "We could not parse the JSON body of your request: it must be a JSON object, sent "
                        "with 'Content-Type: application/json'.", code="invalid_json")
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}." if param else str(first["msg"])
    if first.get("type") == "missing":
        hint = first.get("msg")  # a field's own explanation, where it has one
        message = f"Missing required parameter: '{param}'." + (f" {hint}" if hint and hint != "Field required" else "")
    return APIError(400, message, param=param, code="invalid_value" if first.get("type") != "missing"
                    else "missing_required_parameter")


# FastAPI's detail when reading the body fails for a reason other than bad JSON syntax (invalid UTF-8)
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
_STATUS_TYPES = {404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can raise in OpenAI's shape; never a bare traceback."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        request.state.error_code = exc.code or exc.type
        principal = getattr(exc, "principal", None)
        if principal is not None:  # a genuine but refused key: the audit names it
            request.state.principal = principal
        return error_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = validation_error(exc)
        request.state.error_code = err.code
        return error_response(err)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:  # e.g. a body that is not UTF-8
            err = APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON, "
                           "encoded as UTF-8.", code="invalid_json")
            request.state.error_code = err.code
            return error_response(err)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "Unknown request URL. Check the path and method; see /v1/models for what this server serves."
        err = APIError(exc.status_code, message, type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                       headers=dict(exc.headers or {}))
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # reached only without the recording middleware, which answers such an exception itself (`x-request-id`)
        return unexpected_error_response(request, exc)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
