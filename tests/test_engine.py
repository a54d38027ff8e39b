"""The engine end to end on tiny random models: HF-equal greedy tokens, preemption, invariants, seeds."""

from __future__ import annotations

import random

import pytest

from tests.conftest import FAMILIES
from tests.hf_reference import assert_greedy, hf_greedy, hf_prompt_logprobs
from vattn import LLM, SamplingParams
from vattn.config import EngineConfig
from vattn.engine import LLMEngine

PAGE = 4096  # 32 tokens per page for the tiny models (2 kv heads x 16 dims x fp32)


def prompts_for(seed: int, count: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 45))] for _ in range(count)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def make_llm(path: str, **kw) -> LLM:
    kw.setdefault("page_size", PAGE)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_memory", 4 << 20)
    return LLM(model=path, device="cpu", **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_model, family):
    path = tiny_model(family)
    prompts = prompts_for(1, 5)
    with make_llm(path, max_num_seqs=4) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(12, logprobs=0), use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref, ref_lp = hf_greedy(path, p, 12)
        assert out.outputs[0].token_ids == ref
        ours = [lp[t] for lp, t in zip(out.outputs[0].logprobs, ref)]
        assert ours == pytest.approx(ref_lp, abs=1e-4)
        assert out.outputs[0].finish_reason == "length"


def test_preemption_keeps_outputs_and_leaks_nothing(tiny_model):
    path = tiny_model("llama")
    prompts = prompts_for(2, 6)
    # 3 pages per sequence at most; 2 layers x (K, V) = 4 tensors: a pool for ~2.5 sequences forces preemption
    with make_llm(path, max_num_seqs=6, kv_cache_memory=10 * 4 * PAGE, max_num_batched_tokens=64) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(40), use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert sum(o.metrics.num_preemptions for o in outs) > 0
        llm.engine.kv.reclaim_all()
        pool = llm.engine.kv.pool
        assert pool.num_free == pool.num_pages
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 40)


def test_chunked_prefill_matches(tiny_model):
    path = tiny_model("qwen2")
    prompts = prompts_for(3, 3)
    with make_llm(path, max_num_batched_tokens=8) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(6), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 6)


def test_every_position_below_length_is_mapped_and_pages_come_back(tiny_model):
    path = tiny_model("llama")
    engine = LLMEngine(EngineConfig(model=path, device="cpu", page_size=PAGE, max_model_len=256,
                                    kv_cache_memory=8 * 4 * PAGE, max_num_seqs=4, max_num_batched_tokens=48))
    try:
        for i, p in enumerate(prompts_for(4, 8)):
            engine.add_request(f"r{i}", None, greedy(30 + i), prompt_token_ids=p)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps == 5:
                assert engine.abort("r7") is not None  # an abort mid-flight
            for seq in engine.scheduler.running:
                assert engine.kv.unmapped_positions(seq, seq.num_computed_tokens) == []
        assert engine.scheduler.num_preemptions > 0
        engine.kv.reclaim_all()
        assert engine.kv.pool.num_free == engine.kv.pool.num_pages
        assert engine.kv.stats().units_mapped == 0
    finally:
        engine.close()


def test_deferred_reclamation_reuses_mapped_pages(tiny_model):
    path = tiny_model("llama")
    with make_llm(path, max_num_seqs=1) as llm:
        llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=greedy(40), use_tqdm=False)
        st = llm.kv_stats()
        assert st.units_mapped == 2 and st.units_idle == 2 and st.live_tokens == 0
        map_calls = llm.engine.kv.pool.stats().map_calls
        llm.generate(prompt_token_ids=[[8, 9, 10]], sampling_params=greedy(40), use_tqdm=False)
        assert llm.engine.kv.pool.stats().map_calls == map_calls  # the second sequence mapped nothing new


def test_seeded_sampling_is_independent_of_batch_mates(tiny_model):
    path = tiny_model("mistral")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    prompt = [11, 12, 13, 14]
    with make_llm(path) as llm:
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        batch = llm.generate(prompt_token_ids=[[20, 21], prompt, [30, 31, 32]],
                             sampling_params=[other, params, other], use_tqdm=False)[1]
    assert alone.outputs[0].token_ids == batch.outputs[0].token_ids


def test_prompt_logprobs_match_transformers(tiny_model):
    path = tiny_model("qwen3")
    prompt = prompts_for(5, 1)[0]
    with make_llm(path, max_num_batched_tokens=16) as llm:  # chunked: the prompt spans several steps
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(2, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ours = [d[t] for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert ours == pytest.approx(hf_prompt_logprobs(path, prompt), abs=1e-4)


def test_bad_requests_raise_clear_errors(tiny_model):
    path = tiny_model("llama")
    with make_llm(path, max_model_len=64) as llm:
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate(prompt_token_ids=[list(range(3, 70))], use_tqdm=False)
        with pytest.raises(ValueError, match="empty"):
            llm.generate(prompt_token_ids=[[]], use_tqdm=False)
        with pytest.raises(ValueError, match="vocabulary"):
            llm.generate(prompt_token_ids=[[10**7]], use_tqdm=False)
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=-1)
        # the engine still works after every rejection
        out = llm.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=greedy(3), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 3
        assert not llm.engine.requests


def test_generation_stops_at_max_model_len(tiny_model):
    path = tiny_model("llama")
    with make_llm(path, max_model_len=40) as llm:
        out = llm.generate(prompt_token_ids=[list(range(3, 33))], sampling_params=greedy(100), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_unknown_model_dir_and_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(model=str(tmp_path / "nope"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_interleaved_layout_matches_transformers_under_preemption(tiny_model, family):
    """One virtual tensor [slot, token, layer, k|v, head, dim]: a page holds every layer of a few tokens."""
    path = tiny_model(family)
    prompts = prompts_for(11, 5)
    with make_llm(path, kv_layout="interleaved", max_num_seqs=5, kv_cache_memory=24 * PAGE,
                  max_num_batched_tokens=48, max_model_len=96) as llm:
        kv = llm.engine.kv
        assert len(kv.tensors) == 1 and kv.tokens_per_page < 32  # all layers share a page: fewer tokens a page
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(30), use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        kv.reclaim_all()
        assert kv.pool.num_free == kv.pool.num_pages
    for p, out in zip(prompts, outs):
        assert_greedy(path, p, out.outputs[0].token_ids, 30)


def test_output_kind_final_only_reports_each_request_once_with_the_same_result(tiny_model):
    """Streaming reports a request after every step; final_only only at the end, with identical text and tokens."""
    path = tiny_model("llama")
    prompts = prompts_for(9, 3)
    results = {}
    for kind in ("cumulative", "final_only"):
        engine = LLMEngine(EngineConfig(model=path, device="cpu", kv_cache_memory=4 << 20, max_num_seqs=4))
        try:
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", prompt_token_ids=p, params=greedy(7, output_kind=kind))
            seen = []
            while engine.has_unfinished_requests():
                seen += engine.step()
        finally:
            engine.close()
        finals = {o.request_id: (o.outputs[0].text, o.outputs[0].token_ids) for o in seen if o.finished}
        results[kind] = (len(seen), finals)
    assert results["final_only"][0] == 3 and results["cumulative"][0] == 3 * 7
    assert results["final_only"][1] == results["cumulative"][1] and len(results["final_only"][1]) == 3
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="deltas")


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_stop_string_cuts_the_text_in_the_engine(tiny_model, kv_cache):
    """A stop string taken from the middle of a free run ends the run there, streamed or not."""
    path = tiny_model("llama")
    prompt = prompts_for(11, 1)[0]
    with make_llm(path, kv_cache=kv_cache) as llm:
        free = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(24), use_tqdm=False)[0].outputs[0]
        text = free.text
        assert len(text) > 8
        stop = text[len(text) // 2: len(text) // 2 + 3]
        cut = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(24, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_a_pool_that_cannot_hold_max_model_len_is_refused_or_lowers_the_default(tiny_model, kv_cache):
    path = tiny_model("llama")  # max_position_embeddings 512
    small = 8 * 4 * PAGE  # 8 pages in each of the 4 KV tensors (2 layers): far fewer than 512 tokens
    with pytest.raises(ValueError, match="max_model_len=512.*set max_model_len <= "):
        LLM(model=path, device="cpu", kv_cache=kv_cache, kv_cache_memory=small, page_size=PAGE, max_model_len=512)
    with LLM(model=path, device="cpu", kv_cache=kv_cache, kv_cache_memory=small, page_size=PAGE) as llm:  # the default is lowered
        fits = llm.engine.max_model_len
        assert 1 < fits < 512 and llm.engine.kv.max_sequence_tokens == fits
        out = llm.generate(prompt_token_ids=[prompts_for(3, 1)[0]], sampling_params=greedy(fits), use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "length" and len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == fits


def test_a_vattention_pool_without_a_page_per_tensor_is_refused(tiny_model):
    with pytest.raises(ValueError, match="a token needs a page in each of the 4 KV tensors"):
        LLM(model=tiny_model("llama"), device="cpu", kv_cache_memory=3 * PAGE, page_size=PAGE)


def test_a_failed_start_releases_the_kv_pool(tiny_model):
    """Issue 13 #11: construction that raises after the pool exists must give the pool back (here: memfds, maps)."""
    import os

    path = tiny_model("llama")

    def resources() -> tuple[int, int]:
        with open("/proc/self/maps") as f:
            return len(os.listdir("/proc/self/fd")), sum(1 for line in f if "memfd" in line)

    for attempt in range(2):  # the first round warms up lazy imports and caches
        before = resources()
        for _ in range(10):
            with pytest.raises(ValueError):  # fails in the KV manager, after the pool is made
                LLM(model=path, device="cpu", kv_cache_memory=3 * PAGE, page_size=PAGE)
            with pytest.raises(ValueError):  # fails in the engine, after the whole KV cache is made
                LLM(model=path, device="cpu", kv_cache_memory=32 * PAGE, page_size=PAGE, max_model_len=512)
        if attempt:
            assert resources() == before


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_kv_gauges_never_go_negative_under_preemption_and_sharing(tiny_model, kv_cache):
    """Issue 12: vAttention counted idle rows beyond what was mapped, so free/used page gauges went negative."""
    path = tiny_model("llama")
    engine = LLMEngine(EngineConfig(model=path, device="cpu", kv_cache=kv_cache, page_size=PAGE, max_model_len=128,
                                    kv_cache_memory=6 * 4 * PAGE, max_num_seqs=6, max_num_batched_tokens=64))
    try:
        shared = prompts_for(5, 1)[0] * 3  # a common prefix: idle rows end up mapping the same cached pages
        for i, p in enumerate(prompts_for(4, 4)):
            engine.add_request(f"r{i}", prompt_token_ids=shared[:64] + p[:8], params=SamplingParams(max_tokens=30, n=2, temperature=0.8, seed=i, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            st = engine.kv_stats()
            for name in ("units_free", "units_mapped", "units_idle", "units_shared", "live_tokens", "used_bytes"):
                assert getattr(st, name) >= 0, (name, st)
            assert st.units_free <= st.units_total and st.units_mapped <= st.units_total
            assert 0 <= st.units_mapped - st.units_idle <= st.units_total  # the server's pages_used gauge
            steps += 1
        assert engine.scheduler.num_preemptions > 0 and steps > 0
    finally:
        engine.close()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_parallel_samples_whose_parent_finishes_on_its_first_token(tiny_model, kv_cache):
    """n > 1 forks the samples off sample 0 in the step it samples; sample 0 may finish on that very token."""
    with make_llm(tiny_model("llama"), kv_cache=kv_cache) as llm:
        out = llm.generate(prompt_token_ids=prompts_for(12, 2),
                           sampling_params=SamplingParams(n=3, max_tokens=1, temperature=0.8, seed=1),
                           use_tqdm=False)
        assert [len(o.outputs) for o in out] == [3, 3]
        assert all(len(c.token_ids) == 1 and c.finish_reason == "length" for o in out for c in o.outputs)
        llm.engine.kv.reclaim_all()
        st = llm.kv_stats()
        assert st.units_free == st.units_total


def test_num_threads_is_validated_and_applied(tiny_model):
    import torch

    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        EngineConfig(model=tiny_model("llama"), num_threads=0)
    before = torch.get_num_threads()
    try:
        with make_llm(tiny_model("llama"), num_threads=2):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_llm_generate_takes_vllm_style_dict_prompts(tiny_model):
    """{"prompt": ...} and {"prompt_token_ids": ...} give what a string and prompt_token_ids= give; bad dicts are
    ValueErrors naming the problem."""
    from vattn import LLM

    llm = LLM(model=tiny_model("llama"), device="cpu", dtype="float32", kv_cache_memory=1 << 22)
    try:
        sp = SamplingParams(max_tokens=5, temperature=0)
        ids = llm.tokenizer.encode("hello world")
        want = [o.outputs[0].token_ids for o in llm.generate(["hello world"], sp, use_tqdm=False)
                + llm.generate(prompt_token_ids=[ids], sampling_params=sp, use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt": "hello world"}, {"prompt_token_ids": ids}],
                                                             sp, use_tqdm=False)]
        assert got == want and len(got[0]) == 5
        assert llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0].outputs[0].token_ids == want[1]
        for bad, match in (({"prompt": "a", "prompt_token_ids": [1]}, "exactly one"), ({"text": "a"}, "exactly one"),
                           ({"prompt_token_ids": "abc"}, "list of ints"), ({"prompt": 3}, "must be a string"),
                           (3, "string or a dict")):
            with pytest.raises(ValueError, match=match):
                llm.generate([bad], sp, use_tqdm=False)
    finally:
        llm.close()
