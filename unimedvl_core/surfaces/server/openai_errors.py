"""Errors of the OpenAI-compatible routes in OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``), which its clients read the message from; invalid requests are 400 there, as OpenAI answers.
Every other route keeps FastAPI's ``{"detail": ...}``."""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .openai_schemas import ErrorBody, ErrorResponse

__all__ = ["OPENAI_PATHS", "OpenAIHTTPError", "is_openai_path", "http_error_handler", "validation_error_handler"]

OPENAI_PATHS = ("/v1/chat/", "/v1/images/", "/v1/models")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIHTTPError(HTTPException):
    """An error naming the request field (``param``) and, where OpenAI has one, its ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.param, self.code = param, code


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    status = 400 if status == 422 else status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status, headers=headers)


async def http_error_handler(request: Request, exc: StarletteHTTPException):
    if not is_openai_path(request.url.path):
        return await http_exception_handler(request, exc)
    return _error(exc.status_code, str(exc.detail), getattr(exc, "param", None), getattr(exc, "code", None),
                  getattr(exc, "headers", None))


async def validation_error_handler(request: Request, exc: RequestValidationError):
    if not is_openai_path(request.url.path):
        return await request_validation_exception_handler(request, exc)
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return _error(422, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)
