"""Sharing on the vAttention path: parallel sampling forks, prefix caching, copy-on-write, swap preemption."""

from __future__ import annotations

import pytest

from tests.hf_reference import assert_greedy
from tests.test_engine import PAGE, greedy, make_llm, prompts_for
from vattn import SamplingParams
from vattn.config import EngineConfig
from vattn.engine import LLMEngine


def engine_for(path: str, **kw) -> LLMEngine:
    cfg = dict(model=path, device="cpu", page_size=PAGE, max_model_len=256, kv_cache_memory=64 * 4 * PAGE)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_parallel_samples_share_prompt_pages_and_match_single_requests(tiny_model, kv_cache):
    path = tiny_model("llama")
    prompt = [(11 * i) % 500 + 3 for i in range(75)]  # two full pages and a partial one (32 tokens a page)
    params = SamplingParams(n=3, temperature=1.0, seed=77, max_tokens=10, ignore_eos=True)
    eng = engine_for(path, kv_cache=kv_cache)
    try:
        eng.add_request("n3", None, params, prompt_token_ids=prompt)
        eng.step()  # prefill sample 0, fork samples 1 and 2, sample all three first tokens
        eng.step()  # every sample writes its second token: the shared partial page is copied first
        st = eng.kv_stats()
        per_seq = -(-(len(prompt) + 2) // st.tokens_per_unit)
        assert st.units_shared >= 2  # the full prompt pages are mapped in all three rows
        assert st.units_mapped - st.units_idle < 3 * per_seq  # fewer pages than three private copies
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        shared = outs[-1]
        eng.kv.reclaim_all()
        assert eng.kv_stats().units_mapped == 0 and eng.kv_stats().units_free == eng.kv_stats().units_total
    finally:
        eng.close()
    # each sample equals a lone request seeded the way the sample's generator was (seed + index)
    with make_llm(path, kv_cache=kv_cache) as llm:
        for i, out in enumerate(shared.outputs):
            lone = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
                temperature=1.0, seed=77 + i, max_tokens=10, ignore_eos=True))[0]
            assert out.token_ids == lone.outputs[0].token_ids


def test_prefix_cache_maps_cached_pages_into_another_slot(tiny_model):
    path = tiny_model("qwen2")
    prefix = [(7 * i) % 500 + 3 for i in range(70)]  # two full pages (32 tokens each) and some
    a, b = prefix + [5, 6, 7], prefix + [9, 10]
    eng = engine_for(path, max_num_seqs=2)
    try:
        eng.add_request("a", None, greedy(30), prompt_token_ids=a)
        eng.step()
        eng.add_request("b", None, greedy(8), prompt_token_ids=b)
        eng.step()  # b is admitted with its first 64 tokens mapped from a's pages
        st = eng.kv_stats()
        assert st.prefix_cache_hits == 64 and st.units_shared == 2
        outs = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                outs[o.request_id] = o
    finally:
        eng.close()
    assert_greedy(path, a, outs["a"].outputs[0].token_ids, 30)
    assert_greedy(path, b, outs["b"].outputs[0].token_ids, 8)


def test_prefix_cache_survives_slot_reuse_and_is_exact(tiny_model):
    path = tiny_model("llama")
    base = [(13 * i) % 500 + 3 for i in range(100)]
    with make_llm(path, max_num_seqs=1) as llm:
        first = llm.generate(prompt_token_ids=[base[:100]], sampling_params=greedy(5), use_tqdm=False)[0]
        again = llm.generate(prompt_token_ids=[base[:100]], sampling_params=greedy(5), use_tqdm=False)[0]
        other = llm.generate(prompt_token_ids=[base[:40] + [3, 4, 5]], sampling_params=greedy(5), use_tqdm=False)[0]
        st = llm.kv_stats()
    assert st.prefix_cache_hits == 96 + 32
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert_greedy(path, base[:100], first.outputs[0].token_ids, 5)
    assert_greedy(path, base[:40] + [3, 4, 5], other.outputs[0].token_ids, 5)


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_swap_preemption_keeps_outputs(tiny_model, kv_cache):
    path = tiny_model("mistral")
    prompts = prompts_for(10, 6)
    with make_llm(path, kv_cache=kv_cache, max_num_seqs=6, kv_cache_memory=10 * 4 * PAGE,
                  max_num_batched_tokens=64, preemption_mode="swap") as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(40), use_tqdm=False)
        assert llm.engine.scheduler.swapper.swapped_out_tokens > 0
        assert not llm.engine.scheduler.swapper.host
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 40)


@pytest.mark.parametrize("kv_cache,family,length_penalty", [("vattention", "llama", 1.0),
                                                             ("paged", "qwen2", 0.6)])
def test_beam_search_matches_transformers(tiny_model, kv_cache, family, length_penalty):
    import torch

    from tests.hf_reference import hf_model

    path = tiny_model(family)
    prompts = [[(5 * i) % 400 + 3 for i in range(40)], [17, 18, 19, 20, 21]]
    with make_llm(path, kv_cache=kv_cache, max_num_seqs=8) as llm:
        outs = llm.beam_search(prompt_token_ids=prompts, beam_width=3, max_tokens=10,
                               length_penalty=length_penalty, n=2, use_tqdm=False)
        assert llm.kv_stats().units_free == llm.kv_stats().units_total  # no live beam holds pages
        llm.engine.kv.reclaim_all()
        assert llm.kv_stats().units_shared == 0 and llm.kv_stats().units_mapped == 0
    for p, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_model(path).generate(torch.tensor([p]), num_beams=3, do_sample=False, max_new_tokens=10,
                                          length_penalty=length_penalty, num_return_sequences=2,
                                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert [o.token_ids for o in out.outputs] == [r[len(p):].tolist() for r in ref]


def test_beam_search_forks_share_pages(tiny_model):
    path = tiny_model("llama")
    prompt = [(3 * i) % 400 + 3 for i in range(70)]
    eng = engine_for(path, max_num_seqs=4)
    try:
        eng.add_request("b", None, SamplingParams(use_beam_search=True, beam_width=4, max_tokens=6, temperature=0),
                        prompt_token_ids=prompt)
        eng.step()  # prefill one beam, then it forks into four
        assert eng.kv_stats().units_shared >= 2 and len(eng.scheduler.running) == 4
        while eng.has_unfinished_requests():
            out = eng.step()
        assert out[0].finished and len(out[0].outputs) == 1
    finally:
        eng.close()


def test_beam_search_under_a_tiny_pool_finishes_or_fails_cleanly(tiny_model):
    """Beams that cannot all fit never spin the engine: the search completes or its request is aborted."""
    path = tiny_model("llama")
    prompt = [(7 * i) % 400 + 3 for i in range(60)]
    with make_llm(path, max_num_seqs=4, kv_cache_memory=3 * 4 * PAGE, max_model_len=96) as llm:
        out = llm.beam_search(prompt_token_ids=[prompt], beam_width=4, max_tokens=8, use_tqdm=False)[0]
        assert out.finished
        llm.engine.kv.reclaim_all()
        assert llm.kv_stats().units_free == llm.kv_stats().units_total
