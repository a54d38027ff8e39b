"""The sampler: each logits processor by hand, greedy and seeded sampling, statistics, logprobs."""

import math

import pytest
import torch

from vattn.sampler import (
    Sampler,
    SamplingRow,
    apply_frequency_presence_penalties,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    prompt_logprobs,
    token_counts,
    token_mask,
)
from vattn.sampling_params import SamplingParams

INF = float("inf")


def row(prompt=(), output=(), generator=None, eos=(), **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), list(prompt), list(output), generator, list(eos))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- processors, hand-computed ----


def test_token_mask_and_counts():
    assert token_mask([[0, 2, 2], [], [9, 1]], 4).tolist() == [
        [True, False, True, False],
        [False, False, False, False],
        [False, True, False, False],  # 9 is outside the vocabulary
    ]
    assert token_counts([[1, 1, 3], [0]], 4).tolist() == [[0, 2, 0, 1], [1, 0, 0, 0]]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = token_mask([[0, 1], [3]], 4)
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 0.5]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 6.0]]


def test_frequency_and_presence_penalties():
    logits = torch.zeros(1, 4)
    counts = token_counts([[1, 1, 2]], 4)
    out = apply_frequency_presence_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]


def test_temperature():
    out = apply_temperature(torch.tensor([[2.0, 4.0], [2.0, 4.0]]), torch.tensor([2.0, 0.5]))
    assert out.tolist() == [[1.0, 2.0], [4.0, 8.0]]


def test_top_k_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]] * 3)
    out = apply_top_k(logits, torch.tensor([2, 0, 4]))
    assert out.tolist() == [[-INF, 5.0, -INF, 4.0], [1.0, 5.0, 3.0, 4.0], [1.0, 5.0, 3.0, 4.0]]


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(3, 1)
    out = apply_top_p(logits, torch.tensor([0.7, 0.85, 0.01]))
    kept = (out > -INF).tolist()
    assert kept[0] == [False, True, False, True]  # 0.5, then 0.3 (0.5 before it < 0.7)
    assert kept[1] == [False, True, True, True]  # 0.15 has 0.8 before it < 0.85
    assert kept[2] == [False, True, False, False]  # the top token always stays
    assert torch.equal(out[0][[1, 3]], logits[0][[1, 3]])


def test_top_p_head_shortcut_equals_full_sort():
    torch.manual_seed(5)
    peaked = torch.randn(3, 1000) * 4  # a few tokens hold most of the mass: the head covers p
    flat = torch.randn(3, 1000) * 0.1  # the nucleus is hundreds of tokens: falls back to a full sort
    p = torch.tensor([0.5, 0.6, 0.8])
    assert (peaked.softmax(1).topk(16).values.sum(1) >= p).all()  # the shortcut is really taken
    assert (flat.softmax(1).topk(16).values.sum(1) < p).all()
    for logits in (peaked, flat):
        fast, full = apply_top_p(logits, p, head=16), apply_top_p(logits, p, head=1000)
        assert torch.equal(fast, full)
        kept = (fast > -INF).sum(1)
        assert (kept >= 1).all() and (kept < 1000).all()
    assert ((apply_top_p(flat, torch.tensor([0.9] * 3), head=16) > -INF).sum(1) > 16).all()


def test_min_p_relative_to_top_probability():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert (apply_min_p(logits, torch.tensor([0.2])) > -INF).tolist() == [[False, True, True, True]]
    assert (apply_min_p(logits, torch.tensor([0.65])) > -INF).tolist() == [[False, True, False, False]]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(4, 6)
    rows = [
        row(output=[1], eos=[5], stop_token_ids=[2], min_tokens=3),
        row(output=[1], eos=[5], stop_token_ids=[2], min_tokens=3, ignore_eos=True),
        row(output=[1, 1, 1], eos=[5], stop_token_ids=[2], min_tokens=3),
        row(output=[], eos=[5]),
    ]
    out = Sampler.apply_penalties(logits, rows)
    assert (out == -INF).tolist() == [
        [False, False, True, False, False, True],
        [False, False, True, False, False, False],
        [False] * 6,
        [False] * 6,
    ]


# ---- the sampler end to end ----


def test_greedy_is_argmax_of_processed_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    out = Sampler()(logits, [row(temperature=0) for _ in range(5)])
    assert [r.token_id for r in out] == logits.argmax(1).tolist()
    # a repetition penalty on the top token moves greedy to the runner-up
    logits = torch.tensor([[1.0, 3.0, 2.5, -1.0]])
    assert Sampler()(logits, [row(prompt=[1], temperature=0, repetition_penalty=1.5)])[0].token_id == 2
    assert Sampler()(logits, [row(output=[1, 1], temperature=0, frequency_penalty=0.5)])[0].token_id == 2
    assert Sampler()(logits, [row(output=[1], temperature=0, presence_penalty=0.4)])[0].token_id == 1


def test_min_tokens_blocks_eos_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0]])
    sampler = Sampler()
    for n_out, expected in [(0, 1), (2, 1), (3, 3)]:
        r = row(output=[0] * n_out, eos=[3], min_tokens=3, temperature=0)
        assert sampler(logits, [r])[0].token_id == expected


def test_top_k_1_and_tiny_top_p_equal_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 100) * 3
    greedy = logits.argmax(1).tolist()
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        for _ in range(3):
            out = Sampler()(logits, [row(temperature=1.5, **kwargs) for _ in range(8)])
            assert [r.token_id for r in out] == greedy, kwargs


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(2)
    steps = [torch.randn(5, 64) for _ in range(6)]
    alone = []
    g = gen(1234)
    for logits in steps:
        alone.append(Sampler()(logits[:1], [row(generator=g, seed=1234, temperature=0.9)])[0].token_id)

    # same row (same logits) at position 3 of a batch with unseeded, greedy and other seeded rows
    g_a, g_b = gen(1234), gen(99)
    batched = []
    for logits in steps:
        batch = logits[[1, 2, 4, 0, 3]]
        rows = [
            row(temperature=1.0),
            row(temperature=0),
            row(generator=g_b, seed=99, top_k=5),
            row(generator=g_a, seed=1234, temperature=0.9),
            row(temperature=0.7, top_p=0.9),
        ]
        batched.append(Sampler()(batch, rows)[3].token_id)
    assert batched == alone
    # and the seed matters: another seed gives another sequence (fixed seeds, so deterministic)
    g_c = gen(4321)
    other = [Sampler()(s[:1], [row(generator=g_c, seed=4321, temperature=0.9)])[0].token_id for s in steps]
    assert other != alone


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_matches_softmax_unseeded_batch():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    torch.manual_seed(3)
    out = Sampler()(logits.repeat(n, 1), [row() for _ in range(n)])
    counts = torch.bincount(torch.tensor([r.token_id for r in out]), minlength=6).float()
    # df = 5: P(chi2 > 30) ~ 1.5e-5; a wrong distribution gives hundreds
    assert chi_square(counts, logits.softmax(0)) < 30


def test_sampling_matches_filtered_softmax_seeded():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    g = gen(7)
    sampler = Sampler()
    r = row(generator=g, seed=7, temperature=0.7, top_k=4)
    tokens = [sampler(logits, [r])[0].token_id for _ in range(3000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float()
    assert counts[3] == 0 and counts[4] == 0  # outside the top 4
    keep = [0, 1, 2, 5]
    probs = (logits[0, keep] / 0.7).softmax(0)
    assert chi_square(counts[keep], probs) < 25  # df = 3


def test_logprobs_are_raw_and_include_the_chosen_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    raw = logits.log_softmax(1)
    rows = [
        # penalty and temperature change what is sampled, never the reported logprobs
        row(temperature=0, logprobs=2, prompt=[1], repetition_penalty=10.0),
        row(temperature=0, logprobs=0),
        row(temperature=0.5, logprobs=None),
    ]
    a, b, c = Sampler()(logits, rows)
    assert a.token_id == 3  # 3.0 / 10 drops token 1 below token 3
    assert list(a.top_logprobs) == [1, 3]  # rank order; chosen already among them
    assert a.top_logprobs[1] == pytest.approx(raw[0, 1].item())
    assert a.logprob == pytest.approx(raw[0, 3].item())
    assert b.top_logprobs == {1: pytest.approx(raw[1, 1].item())}
    assert c.top_logprobs is None and c.logprob == pytest.approx(raw[2, c.token_id].item())

    r = row(prompt=[1, 3], temperature=0, repetition_penalty=100.0, logprobs=1)
    (d,) = Sampler()(logits[:1], [r])
    assert d.token_id == 2 and list(d.top_logprobs) == [1, 2]  # top-1, then the chosen one
    assert math.isclose(
        sum(math.exp(v) for v in d.top_logprobs.values()), raw[0, [1, 2]].exp().sum().item(), rel_tol=1e-5
    )


def test_prompt_logprobs():
    torch.manual_seed(4)
    logits = torch.randn(3, 10)
    prompt = [7, 2, 9, 4]
    raw = logits.log_softmax(1)
    out = prompt_logprobs(logits, prompt, k=2)
    assert out[0] is None and len(out) == 4
    for i in range(1, 4):
        top2 = raw[i - 1].topk(2).indices.tolist()
        assert list(out[i])[:2] == top2
        assert set(out[i]) == set(top2) | {prompt[i]}
        assert out[i][prompt[i]] == pytest.approx(raw[i - 1, prompt[i]].item())
    assert prompt_logprobs(logits, prompt, k=0)[2] == {9: pytest.approx(raw[1, 9].item())}
    assert prompt_logprobs(torch.zeros(0, 10), [5], k=3) == [None]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, 4), [row()])
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(4), [row()])
    with pytest.raises(ValueError, match="logits"):
        prompt_logprobs(torch.zeros(3, 10), [1, 2], k=1)
    with pytest.raises(ValueError, match="target_ids"):
        prompt_logprobs(torch.zeros(1, 10), [1, 12], k=1)
    with pytest.raises(ValueError, match="k must"):
        prompt_logprobs(torch.zeros(1, 10), [1, 2], k=-1)
