"""POST /v1/completions: one engine request per prompt, `n` choices each, plain or streamed (SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vattn.outputs import CompletionOutput, RequestOutput
from vattn.server.async_engine import EngineError, RequestGroup
from vattn.server.errors import APIError
from vattn.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    make_usage,
)
from vattn.server.serving import (
    SSE_DONE,
    ServingContext,
    check_not_aborted,
    collect_final,
    random_id,
    sse,
    sse_error,
)


def _prompts(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def completion_logprobs(ctx: ServingContext, token_ids: list[int], dicts: list[dict[int, float] | None],
                        text_offset: int) -> CompletionLogprobs:
    """The legacy format: parallel lists of token strings, their logprobs, top alternatives, text offsets."""
    lp = CompletionLogprobs()
    for tid, d in zip(token_ids, dicts):
        s = ctx.token_text(tid)
        lp.tokens.append(s)
        lp.token_logprobs.append(d.get(tid) if d else None)
        top = {}
        for t, v in (d or {}).items():  # rank order; two ids may decode alike: keep the likelier
            top.setdefault(ctx.token_text(t), v)
        lp.top_logprobs.append(top if d else None)
        lp.text_offset.append(text_offset)
        text_offset += len(s)
    return lp


class _Prompt:
    """One prompt of the request: its text (for echo) and token ids."""

    def __init__(self, text: str, ids: list[int]):
        self.text, self.ids = text, ids

    @classmethod
    async def encode(cls, ctx: ServingContext, prompt: str | list[int]) -> _Prompt:
        """Token ids are checked against the vocabulary before anything decodes them."""
        ids = await ctx.encode_prompt(prompt)
        return cls(prompt if isinstance(prompt, str) else await ctx.decode(ids), ids)


async def create_completion(req: CompletionRequest, raw: Request, ctx: ServingContext) -> Response:
    ctx.check_model(req.model)
    ctx.check_request(req)
    raw_prompts = _prompts(req.prompt)
    params = req.to_sampling_params(req.max_tokens)
    rid, created = random_id("cmpl"), int(time.time())
    group = ctx.group(len(raw_prompts))  # 503 before any work when too many requests wait
    try:
        prompts = [await _Prompt.encode(ctx, p) for p in raw_prompts]
        for p in prompts:
            ctx.check_length(len(p.ids), req.max_tokens)
        for i, p in enumerate(prompts):
            await group.add(f"{rid}-{i}", p.text, params, p.ids)
    except ValueError as exc:  # the engine refused the prompt (too long for it)
        group.abort()
        raise APIError(str(exc), param="prompt") from exc
    except BaseException:
        group.abort()
        raise
    if req.stream:
        return StreamingResponse(_stream(req, ctx, group, prompts, rid, created), media_type="text/event-stream")

    async with group:
        finals = await collect_final(group, raw)
    if finals is None:
        return Response(status_code=499)  # the client closed the connection; nobody reads this
    choices, completion_tokens, cached_tokens = [], 0, 0
    for i, p in enumerate(prompts):
        out = finals[f"{rid}-{i}"]
        check_not_aborted(out)
        cached_tokens += out.num_cached_tokens
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            choices.append(_choice(req, ctx, p, out, o, i * params.n + o.index))
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return JSONResponse(CompletionResponse(
        id=rid, created=created, model=ctx.model_name, choices=choices,
        usage=make_usage(prompt_tokens, completion_tokens, cached_tokens)).model_dump())


def _choice(req: CompletionRequest, ctx: ServingContext, p: _Prompt, out: RequestOutput, o: CompletionOutput,
            index: int) -> CompletionChoice:
    text = (p.text + o.text) if req.echo else o.text
    logprobs = None
    if req.logprobs is not None:
        logprobs = CompletionLogprobs()
        if req.echo:
            logprobs = completion_logprobs(ctx, p.ids, out.prompt_logprobs or [None] * len(p.ids), 0)
            start = len(p.text)
        else:
            start = 0
        gen = completion_logprobs(ctx, o.token_ids, o.logprobs or [], start)
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(logprobs, field).extend(getattr(gen, field))
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=o.finish_reason)


async def _stream(req: CompletionRequest, ctx: ServingContext, group: RequestGroup, prompts: list[_Prompt],
                  rid: str, created: int) -> AsyncIterator[str]:
    n = req.n
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    completion_tokens = cached_tokens = 0
    async with group:  # leaving early (client gone, error) aborts what is unfinished and frees its KV
        try:
            async for out in group.outputs():
                i = int(out.request_id.rsplit("-", 1)[1])
                p = prompts[i]
                if out.finished:
                    check_not_aborted(out)
                    cached_tokens += out.num_cached_tokens
                for o in out.outputs:
                    index = i * n + o.index
                    if index in done:
                        continue
                    first = index not in sent_text
                    t0, k0 = sent_text.get(index, 0), sent_tokens.get(index, 0)
                    delta = o.text[t0:]
                    finish = o.finish_reason
                    if not delta and finish is None and not (first and req.echo):
                        continue  # text held back (a possible stop string, an incomplete character)
                    logprobs = None
                    if req.logprobs is not None:
                        offset = t0 + (len(p.text) if req.echo else 0)
                        logprobs = completion_logprobs(ctx, o.token_ids[k0:], (o.logprobs or [])[k0:], offset)
                    text = (p.text + delta) if first and req.echo else delta
                    sent_text[index], sent_tokens[index] = len(o.text), len(o.token_ids)
                    if finish is not None:
                        done.add(index)
                        completion_tokens += len(o.token_ids)
                    chunk = CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=[
                        CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)])
                    yield sse(chunk.model_dump_json(exclude={"usage"}))
        except (EngineError, APIError) as exc:
            yield sse_error(exc)
            yield SSE_DONE
            return
    if req.include_usage:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        usage = make_usage(prompt_tokens, completion_tokens, cached_tokens)
        yield sse(CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=[], usage=usage))
    yield SSE_DONE
