"""POST /v1/chat/completions: the tokenizer's chat template, then one engine request with `n` choices."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vattn.server.async_engine import EngineError, RequestGroup
from vattn.server.errors import APIError
from vattn.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
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


def chat_logprobs(ctx: ServingContext, token_ids: list[int], dicts: list[dict[int, float] | None],
                  top_k: int) -> ChatLogprobs:
    """OpenAI's chat format: per token its text, logprob, UTF-8 bytes and the top `top_k` alternatives."""
    content = []
    for tid, d in zip(token_ids, dicts):
        d = d or {}
        s = ctx.token_text(tid)
        top = [TopLogprob(token=(t := ctx.token_text(i)), logprob=v, bytes=list(t.encode()))
               for i, v in list(d.items())[:top_k]]  # the engine lists the top-k first, in rank order
        content.append(ChatTokenLogprob(token=s, logprob=d.get(tid, float("nan")), bytes=list(s.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, ctx: ServingContext) -> Response:
    ctx.check_model(req.model)
    ctx.check_request(req)
    try:
        conversation = req.conversation()
    except ValueError as exc:
        raise APIError(str(exc), param="messages") from exc
    max_tokens = req.requested_max_tokens()
    params = req.to_sampling_params(max_tokens)
    rid, created = random_id("chatcmpl"), int(time.time())
    group = ctx.group(1)  # 503 before any work when too many requests wait
    try:
        ids = await ctx.encode_messages(conversation, req.add_generation_prompt, req.chat_template)
        ctx.check_length(len(ids), max_tokens, what="messages")
        await group.add(rid, None, params, ids)
    except ValueError as exc:  # the engine refused the prompt (too long for it)
        group.abort()
        raise APIError(str(exc), param="messages") from exc
    except BaseException:
        group.abort()
        raise
    if req.stream:
        return StreamingResponse(_stream(req, ctx, group, len(ids), rid, created), media_type="text/event-stream")

    async with group:
        finals = await collect_final(group, raw)
    if finals is None:
        return Response(status_code=499)
    out = finals[rid]
    check_not_aborted(out)
    choices = [ChatChoice(
        index=o.index, message=ChatMessageOut(content=o.text), finish_reason=o.finish_reason,
        logprobs=chat_logprobs(ctx, o.token_ids, o.logprobs or [], req.top_logprobs or 0) if req.logprobs else None)
        for o in out.outputs]
    completion_tokens = sum(len(o.token_ids) for o in out.outputs)
    return JSONResponse(ChatCompletionResponse(
        id=rid, created=created, model=ctx.model_name, choices=choices,
        usage=make_usage(len(ids), completion_tokens, out.num_cached_tokens)).model_dump())


async def _stream(req: ChatCompletionRequest, ctx: ServingContext, group: RequestGroup, prompt_tokens: int,
                  rid: str, created: int) -> AsyncIterator[str]:
    def chunk(choices, usage=None) -> str:
        data = ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices,
                                   usage=usage).model_dump(exclude=None if usage else {"usage"})
        for c in data["choices"]:  # a delta carries only what changed
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return sse(json.dumps(data))

    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    completion_tokens = cached_tokens = 0
    for i in range(req.n):  # OpenAI opens each choice with the role
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async with group:
        try:
            async for out in group.outputs():
                if out.finished:
                    check_not_aborted(out)
                    cached_tokens = out.num_cached_tokens
                for o in out.outputs:
                    if o.index in done:
                        continue
                    t0, k0 = sent_text.get(o.index, 0), sent_tokens.get(o.index, 0)
                    delta, finish = o.text[t0:], o.finish_reason
                    if not delta and finish is None:
                        continue
                    logprobs = None
                    if req.logprobs:
                        logprobs = chat_logprobs(ctx, o.token_ids[k0:], (o.logprobs or [])[k0:], req.top_logprobs or 0)
                    sent_text[o.index], sent_tokens[o.index] = len(o.text), len(o.token_ids)
                    if finish is not None:
                        done.add(o.index)
                        completion_tokens += len(o.token_ids)
                    yield chunk([ChatStreamChoice(index=o.index, delta=DeltaMessage(content=delta if delta else None),
                                                  logprobs=logprobs, finish_reason=finish)])
        except (EngineError, APIError) as exc:
            yield sse_error(exc)
            yield SSE_DONE
            return
    if req.include_usage:
        yield chunk([], make_usage(prompt_tokens, completion_tokens, cached_tokens))
    yield SSE_DONE
