"""The correctness oracle: Hugging Face transformers on the same weights."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def hf_model(path: str, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@torch.inference_mode()
def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, one full forward per token (no cache, no eos handling)."""
    model = hf_model(path)
    ids = list(prompt_ids)
    out, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax())
        out.append(tok)
        logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
        ids.append(tok)
    return out, logprobs


@torch.inference_mode()
def hf_prompt_logprobs(path: str, prompt_ids: list[int]) -> list[float]:
    """logprob of prompt token i given tokens < i, for i >= 1."""
    logits = hf_model(path)(torch.tensor([prompt_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
