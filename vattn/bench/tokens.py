"""The greedy-token check between vattn's paths: the same model and requests must give the same tokens.

Two kernels (or two batch compositions) may order float sums differently, which can flip the argmax where two
candidates are tied within the logits' resolution. So a divergence is accepted as a near-tie only when the reference
path's own logprobs, recomputed for that exact prefix, show the two tokens within `near_tie_tolerance(dtype)`:
1e-3 nats in float32; in bf16/fp16, whose logits are quantized at about 4e-3 to 8e-3 nats near 1-2, four units of
the dtype's resolution at that magnitude. Anything else is a mismatch. The check never raises: it returns counts and
examples, so the results are written first and the caller then fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FLOAT32_NEAR_TIE = 1e-3  # nats


def near_tie_tolerance(dtype: torch.dtype, logprob: float = 0.0) -> float:
    """The largest logprob gap two tokens may have and still swap places from float noise alone."""
    if dtype == torch.float32:
        return FLOAT32_NEAR_TIE
    return max(FLOAT32_NEAR_TIE, 4 * torch.finfo(dtype).eps * max(1.0, abs(logprob)))


@dataclass
class TokenCheck:
    compared: list[str] = field(default_factory=list)  # engine labels checked against the reference
    reference: str | None = None
    requests: int = 0
    near_ties: int = 0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)  # the first few mismatches, in words

    @property
    def identical(self) -> bool:
        return self.near_ties == 0 and self.mismatches == 0

    def as_dict(self) -> dict:
        return {"reference": self.reference, "compared": self.compared, "requests": self.requests,
                "near_tie_divergences": self.near_ties, "mismatches": self.mismatches,
                "mismatch_examples": self.examples, "tokens_identical": self.identical}

    def sentence(self, tol_text: str) -> str:
        if not self.compared:
            return "greedy tokens: not compared (fewer than two vattn paths, or a sampled workload)"
        if self.mismatches:
            return (f"greedy tokens: {self.mismatches} MISMATCH(ES) against {self.reference} -- "
                    + "; ".join(self.examples[:3]))
        if self.near_ties:
            return (f"greedy tokens identical on {', '.join([self.reference, *self.compared])} but for "
                    f"{self.near_ties} divergence(s) at a near-tie ({tol_text}, checked)")
        return f"greedy tokens identical on {', '.join([self.reference, *self.compared])} (checked)"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokens(reference: str, ref_tokens: dict[str, list[int]], others: dict[str, dict[str, list[int]]],
                 prompts: dict[str, list[int]], gap_of, dtype: torch.dtype, max_examples: int = 5) -> TokenCheck:
    """Compare each of `others` (label -> request id -> tokens) with the reference's tokens. `gap_of(prompt, a, b)`
    returns the reference's logprob of token a and of token b after `prompt` (for the near-tie proof), or None."""
    chk = TokenCheck(compared=list(others), reference=reference, requests=len(ref_tokens))
    for label, tokens in others.items():
        for rid, a in ref_tokens.items():
            b = tokens.get(rid)
            if b is None:
                chk.mismatches += 1
                chk.examples.append(f"{label} has no output for {rid}")
                continue
            at = first_divergence(a, b)
            if at is None:
                continue
            if at < min(len(a), len(b)):
                lp = gap_of(prompts[rid] + a[:at], a[at], b[at])
                if lp is not None and abs(lp[0] - lp[1]) <= near_tie_tolerance(dtype, lp[0]):
                    chk.near_ties += 1
                    continue
            chk.mismatches += 1
            if len(chk.examples) < max_examples:
                chk.examples.append(f"{reference} and {label} differ on {rid} at output token {at}: "
                                    f"{a[at:at + 5]} vs {b[at:at + 5]}")
    return chk
