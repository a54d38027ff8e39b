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


NEAR_TIE = 1e-4  # logits this close may swap order when the batch (so the float summation order) differs


def assert_greedy(path: str, prompt_ids: list[int], ours: list[int], n: int) -> None:
    """`ours` must be transformers' greedy continuation of n tokens. A divergence is accepted only at a proven
    near-tie (transformers' own logits for the two tokens within NEAR_TIE); the continuations differ after it."""
    assert len(ours) == n, f"expected {n} tokens, got {len(ours)}"
    ref, _ = hf_greedy(path, prompt_ids, n)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            with torch.inference_mode():
                logits = hf_model(path)(torch.tensor([list(prompt_ids) + ref[:i]])).logits[0, -1].float()
            margin = float(logits[b] - logits[a])
            assert margin < NEAR_TIE, f"token {i}: ours {a}, transformers {b} (logit margin {margin:.2e})"
            return
