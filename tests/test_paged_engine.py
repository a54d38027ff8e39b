"""The paged KV path end to end: greedy tokens equal Hugging Face's, under preemption and with prefix caching."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import assert_greedy, hf_prompt_logprobs
from tests.test_engine import greedy, prompts_for
from vattn import LLM, SamplingParams


def paged_llm(path: str, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_model_len", 128)
    kw.setdefault("kv_cache_memory", 1 << 20)
    return LLM(model=path, kv_cache="paged", device="cpu", **kw)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # GQA with head_dim 16 and 32; the KV path is family-blind
def test_paged_greedy_matches_transformers(tiny_model, family):
    path = tiny_model(family)
    prompts = prompts_for(11, 3)
    with paged_llm(path, max_num_seqs=4, max_num_batched_tokens=24) as llm:  # chunked prefill across blocks
        assert llm.engine.kv.kind == "paged"
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(8), use_tqdm=False)
        kv = llm.engine.kv
        assert kv.pool.num_free == kv.num_blocks and not kv.tables
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 8)


def test_paged_preemption_keeps_outputs_and_leaks_nothing(tiny_model):
    path = tiny_model("llama")
    prompts = prompts_for(12, 4)
    block = 4 * 2 * 2 * 16 * 4 * 2  # 4 tokens x 2 layers x (K, V) x 2 heads x 16 dims x fp32
    with paged_llm(path, max_num_seqs=4, kv_cache_memory=24 * block, max_num_batched_tokens=64, max_model_len=96,
                   enable_prefix_caching=False) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(16), use_tqdm=False)
        assert llm.engine.kv.num_blocks == 24 and llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv.pool.num_free == 24
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 16)


def test_paged_prefix_cache_hits_and_keeps_outputs(tiny_model):
    path = tiny_model("qwen3")
    rng = random.Random(13)
    shared = [rng.randrange(3, 500) for _ in range(21)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (3, 7, 1)]
    with paged_llm(path, max_num_seqs=4) as llm:
        first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy(6), use_tqdm=False)
        rest = llm.generate(prompt_token_ids=prompts[1:], sampling_params=greedy(6), use_tqdm=False)
        st = llm.engine.kv_stats()
        assert st.prefix_cache_hits == 2 * 20  # 5 full blocks of the shared 21 tokens, for each later prompt
        again = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy(6), use_tqdm=False)
        # the whole first prompt and its outputs are cached now: all but the last prompt token's block
        assert llm.engine.kv_stats().prefix_cache_hits == 40 + 20
        before = llm.engine.kv_stats().prefix_cache_hits
        lp = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy(1, prompt_logprobs=1),
                          use_tqdm=False)[0]
        assert llm.engine.kv_stats().prefix_cache_hits == before  # prompt logprobs skip the cache
        kv = llm.engine.kv
        assert kv.pool.num_free == kv.num_blocks and len(kv.prefix) > 0
    for p, out in zip(prompts, first + rest):
        assert_greedy(path, p, out.outputs[0].token_ids, 6)
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    ours = [d[t] for d, t in zip(lp.prompt_logprobs[1:], prompts[0][1:])]
    assert ours == pytest.approx(hf_prompt_logprobs(path, prompts[0]), abs=1e-4)


def test_paged_parallel_sampling_shares_blocks_and_matches_unshared(tiny_model):
    """n=3 seeded samples fork sample 0's prompt blocks (copy-on-write on the partial one); the same samples
    computed without sharing (max_num_seqs=1 forbids the fork) must give the same tokens."""
    path = tiny_model("llama")
    prompt = prompts_for(14, 1)[0][:10] + [7]  # 11 tokens: the last block is partial, so a write must copy it
    params = SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=5, ignore_eos=True)
    with paged_llm(path, max_num_seqs=4, enable_prefix_caching=False) as llm:
        shared = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        kv = llm.engine.kv
        assert kv.num_cow_copies >= 2 and kv.pool.num_free == kv.num_blocks
    with paged_llm(path, max_num_seqs=1, enable_prefix_caching=False) as llm:
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        assert llm.engine.kv.num_cow_copies == 0
    assert [o.token_ids for o in shared.outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in shared.outputs}) > 1  # the samples differ, or this proves little


def test_paged_swap_preemption_keeps_outputs(tiny_model):
    path = tiny_model("llama")
    prompts = prompts_for(12, 4)
    block = 4 * 2 * 2 * 16 * 4 * 2
    with paged_llm(path, max_num_seqs=4, kv_cache_memory=24 * block, max_num_batched_tokens=64, max_model_len=96,
                   preemption_mode="swap", enable_prefix_caching=False) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(16), use_tqdm=False)
        assert llm.engine.scheduler.swapper.swapped_in_tokens > 0
        assert llm.engine.kv.pool.num_free == 24
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 16)
