"""The library API: `LLM(...).generate(...)` and `.chat(...)`, offline batched generation over the engine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from vattn.chat_template import encode_chat
from vattn.config import DEFAULT_MODEL_DIR, EngineConfig
from vattn.engine import LLMEngine
from vattn.kv_cache import KVStats
from vattn.outputs import RequestOutput
from vattn.sampling_params import SamplingParams


class LLM:
    """Generate text with a model whose KV cache lives in virtually contiguous, on-demand mapped memory.

    >>> llm = LLM()                                   # the bundled default model, vAttention KV cache
    >>> llm.generate(["The 'assert' statement"], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, kv_cache: str = "vattention", **kwargs):
        self.engine = LLMEngine(EngineConfig(model=str(model or DEFAULT_MODEL_DIR), kv_cache=kv_cache, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs come back in prompt order.

        A prompt is a string, or (as in vLLM) a dict {"prompt": str} or {"prompt_token_ids": [int, ...]}.
        """
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        items = [_prompt_item(p) for p in prompts] if prompts is not None else [(None, list(t)) for t in prompt_token_ids]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts")
        return self._run(items, params, use_tqdm)

    def beam_search(self, prompts: str | Sequence[str] | None = None, beam_width: int = 4, max_tokens: int = 16,
                    length_penalty: float = 1.0, ignore_eos: bool = False, n: int = 1,
                    prompt_token_ids: Sequence[Sequence[int]] | None = None,
                    use_tqdm: bool = True) -> list[RequestOutput]:
        """Beam search; each output holds the best `n` hypotheses, best first. Beams share pages as they fork."""
        params = SamplingParams(use_beam_search=True, beam_width=beam_width, max_tokens=max_tokens,
                                length_penalty=length_penalty, ignore_eos=ignore_eos, n=n, temperature=0)
        return self.generate(prompts, params, prompt_token_ids=prompt_token_ids, use_tqdm=use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate replies."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.encode_chat(conv, add_generation_prompt, chat_template) for conv in conversations]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params, use_tqdm=use_tqdm)

    def encode_chat(self, conversation: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
        return encode_chat(self.tokenizer, conversation, add_generation_prompt, chat_template)

    def _run(self, items, params, use_tqdm: bool) -> list[RequestOutput]:
        ids = []
        try:
            for (prompt, tokens), p in zip(items, params):
                p = dataclasses.replace(p, output_kind="final_only")  # only finished outputs are read here
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p, prompt_token_ids=tokens)
                ids.append(rid)
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [results[rid] for rid in ids]

    def kv_stats(self) -> KVStats:
        """KV memory: mapped, used by live tokens, free, reserved."""
        return self.engine.kv_stats()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prompt_item(p) -> tuple[str | None, list[int] | None]:
    """A prompt as (text, None) or (None, token ids): a string, {"prompt": str} or {"prompt_token_ids": [...]}."""
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        keys = set(p) & {"prompt", "prompt_token_ids"}
        if len(keys) != 1 or set(p) - {"prompt", "prompt_token_ids"}:
            raise ValueError(f"a dict prompt takes exactly one of 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        if "prompt" in p:
            if not isinstance(p["prompt"], str):
                raise ValueError(f"'prompt' must be a string, got {type(p['prompt']).__name__}")
            return p["prompt"], None
        ids = p["prompt_token_ids"]
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("'prompt_token_ids' must be a list of ints")
        return None, list(ids)
    raise ValueError(f"a prompt must be a string or a dict, got {type(p).__name__}")
