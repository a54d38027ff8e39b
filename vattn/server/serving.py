"""What the completion and chat handlers share: the served model, prompt checks, logprob and SSE formatting."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel

from vattn.chat_template import encode_chat
from vattn.outputs import RequestOutput
from vattn.server.async_engine import AsyncEngine, RequestGroup
from vattn.server.errors import APIError


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ServingContext:
    engine: AsyncEngine
    model_name: str

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        """OpenAI clients always send `model`; it must name the model we serve (404 otherwise, as OpenAI)."""
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           status=404, param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        return list(prompt)

    def encode_messages(self, conversation: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None) -> list[int]:
        try:
            return encode_chat(self.tokenizer, conversation, add_generation_prompt, chat_template)
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from exc

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, what: str = "prompt") -> None:
        """The prompt plus the tokens asked for must fit in the context window (vLLM's rule: a 400 otherwise)."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, your {what} has "
                           f"{num_prompt_tokens} tokens, which leaves no room for generated tokens.",
                           param=what if what != "prompt" else "prompt")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, "
                           f"{max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                           param="max_tokens")

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def check_not_aborted(out: RequestOutput) -> None:
    if any(o.finish_reason == "abort" for o in out.outputs):
        raise APIError("the engine aborted this request: it cannot fit in the KV cache with the current "
                       "settings (shorten the prompt or max_tokens, or give the server more KV memory)")


async def collect_final(group: RequestGroup, raw: Request) -> dict[str, RequestOutput] | None:
    """Wait for every request of `group` to finish; None (and the requests aborted) if the client went away."""
    finals: dict[str, RequestOutput] = {}

    async def consume():
        async for out in group.outputs():
            if out.finished:
                finals[out.request_id] = out

    async def watch():  # the body is read already: the next ASGI message is the disconnect, whenever it comes
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    consumer, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(watch())
    try:
        await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            group.abort()
    if consumer.cancelled():
        return None
    consumer.result()  # re-raises EngineError
    return finals


def sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def sse_error(message: str, status: int = 500) -> str:
    return sse(json.dumps({"error": {"message": message, "type": "internal_server_error", "param": None,
                                     "code": status}}))


SSE_DONE = "data: [DONE]\n\n"
