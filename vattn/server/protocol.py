"""Request and response schemas of the OpenAI-compatible API (pydantic), and their mapping onto SamplingParams.

Requests accept and ignore fields we do not know (extra="ignore"), as OpenAI clients send many; fields that
would change the answer and that vattn does not implement (tools, response_format) are refused instead.
Ranges are checked by SamplingParams, so one set of rules serves the library and the server. Every string a
request carries must be valid Unicode: JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer
and no UTF-8 reply can hold.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from vattn.sampling_params import SamplingParams

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"text must be valid Unicode, but it holds a lone surrogate U+{ord(m.group()):04X} at "
                         f"character {m.start()}")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM-style extensions)."""

    model: Text | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False  # beam width: best_of, else n
    length_penalty: float = 1.0

    @property
    def width(self) -> int:
        """Sequences per prompt this request asks for: n, best_of, or the beam width."""
        return max(self.n, self.best_of or 0)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a request field vattn cannot honour; None when there is none."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            return "response_format", (f"response_format of type {fmt.get('type')!r} is not supported: vattn "
                                       "generates free text only (response_format type 'text')")
        if self.best_of is not None and not self.use_beam_search and self.best_of != self.n:
            return "best_of", (f"best_of={self.best_of} with n={self.n} is not supported: without beam search "
                               "vattn returns every sample (leave best_of unset or equal to n)")
        if self.use_beam_search and self.stop:
            return "stop", "stop strings are not supported with beam search"
        return None

    def _sampling_kwargs(self) -> dict[str, Any]:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        kw = dict(n=self.n, stop=self.stop, seed=self.seed, ignore_eos=self.ignore_eos,
                  min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids,
                  skip_special_tokens=self.skip_special_tokens,
                  include_stop_str_in_output=self.include_stop_str_in_output)
        if self.use_beam_search:
            kw.update(use_beam_search=True, beam_width=self.best_of or self.n, length_penalty=self.length_penalty)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:  # None means "the default", as in OpenAI's API
                kw[name] = value
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions API
    logprobs: int | None = None
    echo: bool = False
    suffix: Text | None = None

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported")
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs,
                              prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
                              **self._sampling_kwargs())


class ContentPart(_Request):
    type: Text
    text: Text | None = None


class ChatMessage(_Request):
    role: Text
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        """The message's text; list content may hold only text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"messages: only text content parts are supported, got type {p.type!r}")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: Text | None = None
    # function calling: vattn has none; a request that needs it is refused rather than answered with free text
    tools: list[dict[str, Any]] | None = None
    tool_choice: Text | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Text | dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (function calling) is not supported by vattn"
        for name in ("tool_choice", "function_call"):
            value = getattr(self, name)
            if value is not None and value not in ("none", "auto"):
                return name, f"{name}={value!r} is not supported: vattn has no function calling"
        return super().unsupported()

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        k = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(max_tokens=max_tokens, logprobs=k, **self._sampling_kwargs())


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, not computed


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(_Response):
    role: str = "assistant"
    content: str | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vattn"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
