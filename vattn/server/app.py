"""The FastAPI application: OpenAI-compatible routes over one AsyncEngine, plus tokenize, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vattn.engine import LLMEngine
from vattn.server.async_engine import AsyncEngine, EngineError, ShuttingDown
from vattn.server.chat import create_chat_completion
from vattn.server.completions import create_completion
from vattn.server.config import ServerConfig
from vattn.server.errors import APIError, error_response, install_error_handlers
from vattn.server.metrics import CONTENT_TYPE, ServerMetrics
from vattn.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from vattn.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from vattn.server.serving import ServingContext

log = logging.getLogger("vattn.server")


def served_name(engine: LLMEngine, served_model_name: str | None = None) -> str:
    """--served-model-name, or the model directory's basename."""
    return served_model_name or os.path.basename(os.path.normpath(str(engine.config.model)))


def _start_sandbox(ctx: ServingContext) -> None:
    try:
        ctx.sandbox.start()
    except Exception:  # it is started again on the first client template; that one will see the error
        log.exception("the chat template sandbox did not start")


def build_app(engine: LLMEngine, served_model_name: str | None = None, config: ServerConfig | None = None) -> FastAPI:
    """An app that owns `engine`: the engine thread starts with the app and stops (closing the KV cache) with it.

    `config` bounds what one request may ask and locks the deployment (see ServerConfig)."""
    config = config or ServerConfig()
    metrics = ServerMetrics(engine.config.kv_cache)
    async_engine = AsyncEngine(engine, metrics, max_waiting=config.max_waiting_requests)
    ctx = ServingContext(async_engine, served_name(engine, served_model_name), config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        if ctx.sandbox is not None:  # its child takes seconds to start: not on the first client's time
            asyncio.get_running_loop().run_in_executor(None, _start_sandbox, ctx)
        log.info("serving %s (kv_cache=%s, max_model_len=%d, max_num_seqs=%d%s)", ctx.model_name,
                 engine.config.kv_cache, engine.max_model_len, engine.config.max_num_seqs,
                 ", API key required" if config.api_key else "")
        try:
            yield
        finally:
            async_engine.shutdown()
            ctx.close()

    app = FastAPI(title="vattn", lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    # outermost last: the key is checked before a byte of the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(_: Request, exc: ShuttingDown):
        return error_response(str(exc), 503)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return error_response(str(exc), 500)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response("internal server error (see the server log)", 500)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return error_response("the engine is not running", 503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        # `root` is the served name, not the model's path on this machine
        return ModelList(data=[ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await create_completion(req, raw, ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(req, raw, ctx)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            tokens = await ctx.encode_text(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            try:
                conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as exc:
                raise APIError(str(exc), param="messages") from exc
            tokens = await ctx.encode_messages(conversation, req.add_generation_prompt)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await ctx.decode(req.tokens)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
