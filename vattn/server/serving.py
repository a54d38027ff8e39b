"""What the completion and chat handlers share: the served model, request bounds, prompt encoding (off the event
loop), logprob and SSE formatting."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel

from vattn.chat_template import ChatTemplateError, render_chat, template_variables
from vattn.loader import read_config
from vattn.models import ModelConfig
from vattn.outputs import RequestOutput
from vattn.server.async_engine import AsyncEngine, EngineError, Overloaded, RequestGroup, ShuttingDown
from vattn.server.config import ServerConfig
from vattn.server.errors import APIError, error_body
from vattn.server.protocol import _SamplingFields
from vattn.server.template_sandbox import TemplateSandbox

RETRY_AFTER_SECONDS = 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: its longest vocabulary string (byte-level BPE
    spells each byte as one character; SentencePiece's byte tokens read <0x0A>), at least 1."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


@dataclass
class ServingContext:
    engine: AsyncEngine
    model_name: str
    config: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        model_vocab = ModelConfig.from_hf(read_config(self.engine.engine.config.model)).vocab_size
        self.vocab_size = min(len(tok), model_vocab)  # ids the tokenizer can decode and the model can embed
        # a text longer than this cannot be max_model_len tokens or fewer (2x margin for normalizers that
        # merge characters), so it is refused before spending seconds and gigabytes tokenizing it
        self.max_prompt_chars = 2 * self.max_model_len * _longest_token_chars(tok)
        # tokenization and template rendering run here, never on the event loop; two threads bound the memory
        # that huge inputs can take at once
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vattn-tokenize")
        self.sandbox = (TemplateSandbox(self.config.chat_template_timeout, self.config.chat_template_memory)
                        if self.config.trust_request_chat_template else None)
        self.template_variables = template_variables(tok)

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.sandbox is not None:
            self.sandbox.close()

    async def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    # -- checks ------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """OpenAI clients always send `model`; it must name the model we serve (404 otherwise, as OpenAI)."""
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           status=404, param="model", code="model_not_found")

    def check_request(self, req: _SamplingFields) -> None:
        """What the server bounds (n, best_of, beam width, stop strings) and what vattn cannot do (400)."""
        bad = req.unsupported()
        if bad is not None:
            raise APIError(bad[1], param=bad[0])
        cfg = self.config
        for name in ("n", "best_of"):
            value = getattr(req, name)
            if value is not None and value > cfg.max_n:
                what = "beam width" if req.use_beam_search and name == "best_of" else name
                raise APIError(f"{name} must be <= {cfg.max_n} (the {what} this server allows; see --max-n), "
                               f"got {value}", param=name)
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > cfg.max_stop_strings:
            raise APIError(f"stop may hold at most {cfg.max_stop_strings} strings (see --max-stop-strings), "
                           f"got {len(stops)}", param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > cfg.max_stop_str_len:
            raise APIError(f"stop strings may be at most {cfg.max_stop_str_len} characters long (see "
                           f"--max-stop-str-len), got one of {longest}", param="stop")
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"{param} has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}", param=param)

    def check_text_length(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens, and your {param} "
                           f"has {len(text)} characters: far more tokens than that.", param=param)

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

    # -- encoding, off the event loop --------------------------------------------------------------
    async def encode_text(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        self.check_text_length(text, param)
        return await self.run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        if isinstance(prompt, str):
            return await self.encode_text(prompt)
        self.check_token_ids(prompt, "prompt")
        return list(prompt)

    async def decode(self, ids: list[int]) -> str:
        return await self.run(self.tokenizer.decode, ids)

    async def encode_messages(self, conversation: list[dict], add_generation_prompt: bool = True,
                              chat_template: str | None = None) -> list[int]:
        """The conversation rendered with the model's chat template (or, if this server trusts them, the
        client's, in the sandbox) and tokenized. Template failures are the client's: 400."""
        try:
            if chat_template is None:
                text = await self.run(render_chat, self.tokenizer, conversation, add_generation_prompt)
            elif self.sandbox is None:
                raise APIError("chat_template: this server does not accept chat templates in requests (start it "
                               "with --trust-request-chat-template to allow them)", param="chat_template")
            else:
                text = await self.sandbox.render(chat_template, conversation, add_generation_prompt,
                                                 self.template_variables, self.max_prompt_chars)
        except ChatTemplateError as exc:
            raise APIError(str(exc), param="chat_template" if chat_template is not None else "messages") from exc
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from exc
        # the template already carries any special tokens (BOS) it wants
        return await self.encode_text(text, "messages", add_special_tokens=False)

    def group(self, num_requests: int) -> RequestGroup:
        """A RequestGroup admitted for `num_requests` engine requests: 503 + Retry-After when too many wait."""
        bound = self.engine.max_waiting
        if bound is not None and num_requests > bound:
            raise APIError(f"this request holds {num_requests} prompts, more than the {bound} this server queues "
                           "at once (see --max-waiting-requests)", param="prompt")
        try:
            return RequestGroup(self.engine, num_requests)
        except Overloaded as exc:
            raise APIError(str(exc), status=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def check_not_aborted(out: RequestOutput) -> None:
    """A finished request that the engine aborted (an aborted beam search answers with no hypotheses at all)."""
    if not out.outputs or any(o.finish_reason == "abort" for o in out.outputs):
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
        gone = not consumer.done()
        for task in (watcher, consumer):
            task.cancel()
        if gone:
            group.abort()
        for task in (watcher, consumer):  # let the cancellations land before reading results
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if gone:
        return None
    consumer.result()  # re-raises EngineError
    return finals


def sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def error_status(exc: APIError | EngineError) -> int:
    if isinstance(exc, APIError):
        return exc.status
    return 503 if isinstance(exc, ShuttingDown) else 500


def sse_error(exc: APIError | EngineError) -> str:
    """The stream's error event: the same body, type and code as the non-streaming reply for the same cause."""
    status = error_status(exc)
    param, code = (exc.param, exc.code) if isinstance(exc, APIError) else (None, None)
    return sse(json.dumps(error_body(str(exc), status, param, code)))


SSE_DONE = "data: [DONE]\n\n"
