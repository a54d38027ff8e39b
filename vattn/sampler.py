"""Turn one step's logits into tokens: logits processors, sampling and logprobs.

Processing order, per row of the logits matrix:
  1. min_tokens: while len(output) < min_tokens, eos (unless ignore_eos) and stop_token_ids get -inf.
  2. repetition_penalty over prompt + output tokens (HF semantics: positive logits are divided by
     the penalty, negative ones multiplied).
  3. frequency_penalty * count and presence_penalty * (count > 0) subtracted, output tokens only
     (OpenAI semantics).
  4. greedy rows stop here and take the argmax. The others go on:
  5. temperature, 6. top_k, 7. top_p, 8. min_p (each masks the tokens it removes with -inf),
  9. sample from softmax with an exponential race: argmax(probs / q), q ~ Exp(1) per token.
Reported logprobs always come from the raw logits (log_softmax before any processing).

A row with its own torch.Generator draws exactly one uniform vector of vocabulary size per
sampled step (q = -log(u)) from that generator and nothing else, so a seeded request gives the
same tokens whatever else shares its batch. Rows without a generator share one default draw.
A greedy row draws nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vattn.models import cpu_layers
from vattn.sampling_params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny  # keeps q > 0 so probs / q never divides by zero


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the logits matrix."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far
    generator: torch.Generator | None  # per-sequence, on the logits' device, when params.seed is set
    eos_token_ids: Sequence[int] = ()  # blocked while len(output) < min_tokens unless ignore_eos


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # raw model logprob of the chosen token (0.0 when no row of the batch asked for logprobs)
    # top-`logprobs` of the raw distribution in rank order, then the chosen token if not among them
    top_logprobs: dict[int, float] | None


# ---- building blocks: each takes [N, V] logits and per-row parameters, returns new logits ----


def token_mask(token_lists: Sequence[Sequence[int]], vocab_size: int, device=None) -> Tensor:
    """[N, V] bool: True where row i's list contains the token. Ids outside the vocabulary are ignored."""
    mask = torch.zeros(len(token_lists), vocab_size, dtype=torch.bool, device=device)
    rows, cols = _flatten(token_lists, vocab_size, device)
    mask[rows, cols] = True
    return mask


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device=None) -> Tensor:
    """[N, V] float32: how often each token occurs in row i's list."""
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    rows, cols = _flatten(token_lists, vocab_size, device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
    return counts


def _flatten(token_lists: Sequence[Sequence[int]], vocab_size: int, device) -> tuple[Tensor, Tensor]:
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(token_lists):
        kept = [t for t in ids if 0 <= t < vocab_size]
        rows.extend([i] * len(kept))
        cols.extend(kept)
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    )


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF semantics on tokens in `seen` [N, V]: logit / p if positive, logit * p otherwise. penalty: [N]."""
    p = penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(
    logits: Tensor, counts: Tensor, frequency: Tensor, presence: Tensor
) -> Tensor:
    """OpenAI semantics: logit - frequency * count - presence * (count > 0). frequency, presence: [N]."""
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide row i by temperature[i] (> 0)."""
    return logits / temperature.to(logits.dtype).unsqueeze(1)


def apply_top_k(logits: Tensor, k: Tensor) -> Tensor:
    """Keep the k[i] largest logits of row i (ties with the k-th are kept too); k <= 0 or >= V keeps all."""
    vocab = logits.shape[1]
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k).long()
    head = logits.topk(int(k.max()), dim=1).values  # sorted, descending; cheaper than a full sort
    kth = head.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: Tensor, head: int = 128) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p[i].

    A token stays when the probability of all tokens ranked before it is < p, so the most likely
    token always stays; p >= 1 keeps everything. Only the `head` most likely tokens are sorted when
    they already reach p in every row (the usual case for a peaked distribution), else the whole row.
    """
    probs = logits.softmax(dim=1)
    vocab = probs.shape[1]
    threshold = torch.where(p >= 1, torch.full_like(p, 2.0), p).to(probs.dtype).unsqueeze(1)
    k = min(head, vocab)
    while True:
        top_probs, top_ids = probs.topk(k, dim=1)
        total = top_probs.cumsum(dim=1)
        if k == vocab or bool((total[:, -1:] >= threshold).all()):
            break  # every token outside the head has >= p before it: all dropped
        k = vocab
    keep_sorted = (total - top_probs) < threshold
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_ids, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p[i] times the row's top probability."""
    probs = logits.softmax(dim=1)
    threshold = min_p.to(probs.dtype).unsqueeze(1) * probs.max(dim=1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_exponential_race(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """One token per row, drawn from probs [M, V]: argmax(probs / q) with q ~ Exp(1).

    q = -log(u), u ~ U[0, 1) (several times faster than exponential_() on CPU). Row i with a
    generator draws its V uniforms from it alone; rows without share one draw from the default one.
    """
    m, vocab = probs.shape
    u = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), vocab, dtype=probs.dtype, device=probs.device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(vocab, dtype=probs.dtype, device=probs.device, generator=g)
    q = u.log_().neg_().clamp_min_(_TINY)  # u = 0 gives q = inf: that token cannot win
    return cpu_layers.argmax(probs / q)


# ---- the sampler ----


class Sampler:
    """Samples one token per row of a [N, V] logits matrix; see the module docstring for the order."""

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [num_rows, vocab_size], got shape {tuple(logits.shape)}")
        if logits.shape[0] != len(rows):
            raise ValueError(f"rows must have one entry per logits row ({logits.shape[0]}), got {len(rows)}")
        if not rows:
            return []
        logits = logits.float()
        x = self.apply_penalties(logits, rows)

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == len(rows):  # an all-greedy batch: no row indexing, no copy
            return self._results(logits, cpu_layers.argmax(x), rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            tokens[greedy] = cpu_layers.argmax(x[greedy])
        if sampled:
            probs = self.filtered_probs(x[sampled], [rows[i].params for i in sampled])
            tokens[sampled] = sample_exponential_race(probs, [rows[i].generator for i in sampled])
        return self._results(logits, tokens, rows)

    @staticmethod
    def apply_penalties(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
        """Steps 1-3: min_tokens, repetition, frequency and presence penalties."""
        vocab = logits.shape[1]
        device = logits.device
        x = logits  # replaced, never written in place: the raw logits stay for the reported logprobs

        blocked: list[list[int]] = []
        for r in rows:
            ids: list[int] = []
            if len(r.output_token_ids) < r.params.min_tokens:
                ids.extend(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    ids.extend(r.eos_token_ids)
            blocked.append(ids)
        if any(blocked):
            x = x.masked_fill(token_mask(blocked, vocab, device), float("-inf"))

        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            seen = token_mask(
                [list(rows[i].prompt_token_ids) + list(rows[i].output_token_ids) for i in rep], vocab, device
            )
            penalty = torch.tensor([rows[i].params.repetition_penalty for i in rep], device=device)
            x = x.clone() if x is logits else x
            x[rep] = apply_repetition_penalty(x[rep], seen, penalty)

        pen = [
            i
            for i, r in enumerate(rows)
            if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
        ]
        if pen:
            counts = token_counts([rows[i].output_token_ids for i in pen], vocab, device)
            freq = torch.tensor([rows[i].params.frequency_penalty for i in pen], device=device)
            pres = torch.tensor([rows[i].params.presence_penalty for i in pen], device=device)
            x = x.clone() if x is logits else x
            x[pen] = apply_frequency_presence_penalties(x[pen], counts, freq, pres)
        return x

    @staticmethod
    def filtered_probs(x: Tensor, params: list[SamplingParams]) -> Tensor:
        """Steps 5-8 on non-greedy rows: temperature, top_k, top_p, min_p; returns probabilities.

        Each filter runs only on the rows that use it.
        """
        device = x.device
        x = apply_temperature(x, torch.tensor([p.temperature for p in params], device=device))
        vocab = x.shape[1]
        rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
        if rows:
            x[rows] = apply_top_k(x[rows], torch.tensor([params[i].top_k for i in rows], device=device))
        rows = [i for i, p in enumerate(params) if p.top_p < 1]
        if rows:
            x[rows] = apply_top_p(x[rows], torch.tensor([params[i].top_p for i in rows], device=device))
        rows = [i for i, p in enumerate(params) if p.min_p > 0]
        if rows:
            x[rows] = apply_min_p(x[rows], torch.tensor([params[i].min_p for i in rows], device=device))
        return x.softmax(dim=1)

    @staticmethod
    def _results(logits: Tensor, tokens: Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """Raw logprobs of the chosen tokens and the top-k asked for, as (logit - max) - log(sum(exp)).

        Matches log_softmax to float32 rounding without keeping an [N, V] logprobs tensor around.
        """
        token_list = tokens.tolist()
        if all(r.params.logprobs is None for r in rows):  # nobody reads a logprob: skip the log-sum-exp
            return [SampleResult(token_id=tok, logprob=0.0, top_logprobs=None) for tok in token_list]
        top1 = logits.max(dim=1, keepdim=True).values
        log_sum = (logits - top1).exp_().sum(dim=1).log_()
        chosen = (logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - top1.squeeze(1) - log_sum).tolist()
        want = [i for i, r in enumerate(rows) if r.params.logprobs]  # None and 0 need no top-k
        tops: dict[int, dict[int, float]] = {}
        if want:
            kmax = min(max(rows[i].params.logprobs for i in want), logits.shape[1])
            top = logits[want].topk(kmax, dim=1)
            values = (top.values - top1[want] - log_sum[want].unsqueeze(1)).tolist()
            for i, ids, vals in zip(want, top.indices.tolist(), values):
                k = rows[i].params.logprobs
                tops[i] = dict(zip(ids[:k], vals[:k]))
        results = []
        for i, (tok, lp, r) in enumerate(zip(token_list, chosen, rows)):
            top_logprobs = None
            if r.params.logprobs is not None:
                top_logprobs = tops.get(i, {})
                top_logprobs.setdefault(tok, lp)
            results.append(SampleResult(token_id=tok, logprob=lp, top_logprobs=top_logprobs))
        return results


# ---- logprobs of given tokens (prompt logprobs) ----


def token_logprobs(logits: Tensor, target_ids: Sequence[int], k: int) -> list[dict[int, float]]:
    """For each row i: {target_ids[i]: its raw logprob} plus the row's top-k tokens (rank order first)."""
    if logits.dim() != 2 or logits.shape[0] != len(target_ids):
        raise ValueError(
            f"target_ids must have one entry per logits row ({tuple(logits.shape)}), got {len(target_ids)}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if not target_ids:
        return []
    vocab = logits.shape[1]
    if any(not 0 <= t < vocab for t in target_ids):
        raise ValueError(f"target_ids must be in [0, {vocab}), got {list(target_ids)}")
    logprobs = logits.float().log_softmax(dim=1)
    targets = torch.tensor(list(target_ids), dtype=torch.long, device=logits.device)
    target_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    top_ids: list[list[int]] = [[] for _ in target_ids]
    top_vals: list[list[float]] = [[] for _ in target_ids]
    if k:
        top = logprobs.topk(min(k, vocab), dim=1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    out = []
    for t, lp, ids, vals in zip(target_ids, target_lp, top_ids, top_vals):
        d = dict(zip(ids, vals))
        d.setdefault(int(t), lp)
        out.append(d)
    return out


def prompt_logprobs(logits: Tensor, prompt_token_ids: Sequence[int], k: int) -> list[dict[int, float] | None]:
    """Logprobs of each prompt token given the tokens before it.

    logits: [P-1, V], row i-1 being the model's prediction for position i. Entry 0 is None.
    """
    if len(prompt_token_ids) < 1:
        raise ValueError("prompt_token_ids must not be empty")
    if logits.dim() != 2 or logits.shape[0] != len(prompt_token_ids) - 1:
        raise ValueError(
            f"logits must have len(prompt_token_ids) - 1 = {len(prompt_token_ids) - 1} rows, "
            f"got shape {tuple(logits.shape)}"
        )
    return [None, *token_logprobs(logits, prompt_token_ids[1:], k)]
