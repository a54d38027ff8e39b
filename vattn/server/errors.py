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

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable"}
_FIELD = re.compile(r"^([a-z_]+) ")


class APIError(Exception):
    """An error the client should see as-is, with an HTTP status and optionally the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.headers = headers


def field_of(message: str) -> str | None:
    """SamplingParams messages start with the field's name ("top_p must be ..."): report it as `param`."""
    m = _FIELD.match(message)
    return m.group(1) if m and m.group(1) in _KNOWN_FIELDS else None


_KNOWN_FIELDS = (set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
                 | {f.name for f in dataclasses.fields(SamplingParams)})


def error_body(message: str, status: int = 400, param: str | None = None, code=None) -> dict:
    """{"error": {...}}: one shape, and one `type` per status, for JSON responses and stream error events alike."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate must not fail the reply
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, HTTPStatus(status).phrase),
                                         param=param, code=code)).model_dump()


def error_response(message: str, status: int = 400, param: str | None = None, code=None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


_LOC_PART = re.compile(r"^(\d+|[A-Za-z_][A-Za-z0-9_]*)$")  # a field name or list index, not "list[int]"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per offending field. A union (`prompt: str | list[int] | ...`) fails once per member: when one
    of them failed on the value itself (not its type), that is the message the client needs."""
    parts, param = [], None
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc holds the character position, not a field
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and _LOC_PART.match(str(x))]
        by_field.setdefault(".".join(loc), []).append(err)
    for where, errs in by_field.items():
        param = param or (where.split(".")[0] or None)
        specific = [e for e in errs if e.get("type") == "value_error"] or errs
        msgs = list(dict.fromkeys(str(e.get("msg")).removeprefix("Value error, ") for e in specific))
        parts.append(f"{where or 'body'}: {'; '.join(msgs)}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as 4xx/5xx with an OpenAI-style body (FastAPI's 422 becomes 400)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.param, exc.code, exc.headers)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError):
        return error_response(str(exc), 400, field_of(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)
