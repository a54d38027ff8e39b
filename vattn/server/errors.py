"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}, for every failure the server reports."""

from __future__ import annotations

import dataclasses
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vattn.sampling_params import SamplingParams
from vattn.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 500: "internal_server_error",
          503: "service_unavailable"}
_FIELD = re.compile(r"^([a-z_]+) ")


class APIError(Exception):
    """An error the client should see as-is, with an HTTP status and optionally the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def field_of(message: str) -> str | None:
    """SamplingParams messages start with the field's name ("top_p must be ..."): report it as `param`."""
    m = _FIELD.match(message)
    return m.group(1) if m and m.group(1) in _KNOWN_FIELDS else None


_KNOWN_FIELDS = (set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
                 | {f.name for f in dataclasses.fields(SamplingParams)})


def error_response(message: str, status: int = 400, param: str | None = None, code=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, HTTPStatus(status).phrase),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":  # loc holds the character position, not a field
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        else:
            param = param or (loc[0] if loc else None)
            parts.append(f"{where or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as 4xx/5xx with an OpenAI-style body (FastAPI's 422 becomes 400)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.param, exc.code)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError):
        return error_response(str(exc), 400, field_of(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)
