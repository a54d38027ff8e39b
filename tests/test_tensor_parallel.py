"""Tensor parallelism on CPU (gloo, 2 processes): tokens equal transformers' on every family and both KV paths, each
rank holds its share of the KV cache and gives every page back, sharing and preemption replay on the workers, clear
errors, a dead worker stops the engine (and the server) instead of hanging it.

Each LLM(tensor_parallel_size=2) starts a worker process: tests use one LLM for several prompts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from allocator import (
    JournalMismatchError,
    PagePool,
    VirtualTensor,
    copy_on_write_many,
    map_many,
    open_backend,
    replay,
)
from tests.hf_reference import assert_greedy
from tests.server_utils import RemoteServer
from tests.tiny_models import get_tiny_model, read_config
from vattn import LLM, SamplingParams
from vattn.config import EngineConfig
from vattn.distributed import WorkerDiedError
from vattn.models.config import ModelConfig
from vattn.models.parallel import check_divisible, kv_head_range

PAGE = 4096


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def make_llm(path, kv_cache: str, tp: int, **kw) -> LLM:
    kw.setdefault("page_size", PAGE)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_memory", 4 << 20)
    return LLM(model=str(path), kv_cache=kv_cache, device="cpu", tensor_parallel_size=tp, **kw)


def run_to_end(engine, prompts, params) -> list:
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return [outs[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def family_model(tiny_model, tiny_model_root):
    """(family) -> model dir. qwen3 gets a single kv head, so TP=2 replicates it (the other families split 2)."""
    def get(family: str) -> Path:
        if family == "qwen3":
            return get_tiny_model("qwen3", tiny_model_root, num_key_value_heads=1)
        return Path(tiny_model(family))
    return get


# -- greedy tokens, KV shares, pages back: one TP=2 LLM per (family, path) ----------------------------------------------
@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tp2_greedy_matches_transformers_and_holds_its_kv_share(family_model, family, kv_cache):
    path = family_model(family)
    prompts = random_prompts(len(family) * 10 + len(kv_cache), [64, 128, 64])  # whole pages of both TP sizes
    n = 10
    kv_heads = ModelConfig.from_hf(read_config(path)).num_kv_heads
    share = 2 if kv_heads >= 2 else 1  # split kv heads: half the bytes per rank; replicated: the same bytes

    mapped = {}
    for tp in (1, 2):
        with make_llm(path, kv_cache, tp, background_mapping=False) as llm:
            engine = llm.engine
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", None, greedy(n), prompt_token_ids=p)
            engine.step()  # every prompt prefills in this first step
            mapped[tp] = [s.mapped_bytes for s in engine.rank_kv_stats()]
            outs = run_to_end(engine, prompts, greedy(n))
            engine.kv.reclaim_all()
            final = engine.rank_kv_stats()
        for p, out in zip(prompts, outs):
            assert_greedy(str(path), p, out.outputs[0].token_ids, n)
        assert len(final) == tp
        for rank, st in enumerate(final):
            if kv_cache == "vattention" or rank == 0:  # (paged workers hold no allocation state of their own)
                assert st.units_mapped == 0 and st.units_free == st.units_total, f"rank {rank}: {st}"
        assert len({(st.units_total, st.page_bytes) for st in final}) == 1  # twins: same pool on every rank
    assert mapped[1][0] > 0
    if kv_cache == "vattention":  # workers' pools were mapped by replaying rank 0's journal
        assert mapped[2] == [mapped[1][0] // share] * 2
    else:
        assert mapped[2][0] == mapped[1][0] // share


# -- sharing, forks, beams and preemption replay on the workers ----------------------------------------------------------
def test_tp2_prefix_sharing_forks_and_preemption_give_tp1_tokens(tiny_model):
    path = tiny_model("llama")
    rng = random.Random(7)
    prefix = [rng.randrange(3, 500) for _ in range(70)]
    prompts = [prefix + [rng.randrange(3, 500) for _ in range(k)] for k in (5, 9, 3)] + random_prompts(8, [40, 20])
    params = [greedy(24), greedy(24, n=2), greedy(24), greedy(24), greedy(24, n=2)]
    beam = dict(beam_width=2, max_tokens=10, ignore_eos=True)
    # the same page structure on both sizes: 64 tokens per page, 6 pages per tensor (TP=2 pages are half the bytes)
    sizes = {1: dict(page_size=2 * PAGE, kv_cache_memory=6 * 4 * 2 * PAGE),
             2: dict(page_size=PAGE, kv_cache_memory=6 * 4 * PAGE)}
    results = {}
    for tp in (1, 2):
        with make_llm(path, "vattention", tp, max_num_seqs=6, max_num_batched_tokens=96, **sizes[tp]) as llm:
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            beams = llm.beam_search(prompt_token_ids=[prompts[3]], use_tqdm=False, **beam)
            stats = llm.engine.stats()
            counters = llm.engine.kv.pool.counters
            results[tp] = ([[c.token_ids for c in o.outputs] for o in outs], [c.token_ids for c in beams[0].outputs])
            assert stats.num_preemptions > 0, "the pool should force preemption"
            assert stats.kv.prefix_cache_hits > 0 and counters.cow_copies > 0  # sharing and copy-on-write ran
            llm.engine.kv.reclaim_all()
            assert all(st.units_mapped == 0 for st in llm.engine.rank_kv_stats())
    assert results[2] == results[1]


# -- errors ---------------------------------------------------------------------------------------------------------
def test_indivisible_shapes_are_refused_before_any_worker_starts(tiny_model_root):
    path = get_tiny_model("qwen3", tiny_model_root, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads=3"):
        make_llm(path, "vattention", 2)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=96,
                      num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8, rms_norm_eps=1e-6,
                      max_position_embeddings=64)
    check_divisible(cfg, 4)
    check_divisible(cfg, 8)  # 4 kv heads over 8 ranks: each kv head replicated on 2 ranks
    with pytest.raises(ValueError, match="num_key_value_heads=6: one must divide the other"):
        check_divisible(ModelConfig(**{**cfg.__dict__, "num_heads": 12, "num_kv_heads": 6}), 4)
    with pytest.raises(ValueError, match="intermediate_size=90"):
        check_divisible(ModelConfig(**{**cfg.__dict__, "num_kv_heads": 2, "intermediate_size": 90}), 4)
    assert [kv_head_range(1, 4, r) for r in range(4)] == [(0, 1)] * 4
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]


def test_bad_sizes_and_modes_are_clear_errors(tiny_model):
    path = tiny_model("llama")
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        EngineConfig(model=path, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="preemption_mode='swap' is not supported with tensor_parallel_size > 1"):
        EngineConfig(model=path, tensor_parallel_size=2, preemption_mode="swap")
    cores = os.cpu_count() or 1
    with pytest.raises(ValueError, match=f"tensor_parallel_size={cores + 1} is more than this machine's {cores} CPU"):
        make_llm(path, "vattention", cores + 1)


def test_a_dead_worker_is_a_clear_error_not_a_hang(tiny_model):
    path = tiny_model("llama")
    llm = make_llm(path, "vattention", 2)
    engine = llm.engine
    worker = engine.tp.workers[0]
    try:
        for i, p in enumerate(random_prompts(3, [20, 30])):
            engine.add_request(f"r{i}", None, greedy(50), prompt_token_ids=p)
        engine.step()
        engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        box = []

        def steps():
            try:
                for _ in range(5):
                    engine.step()
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=steps, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "a step hung after its worker died"
        assert box and isinstance(box[0], WorkerDiedError), box
        assert f"rank 1 (pid {worker.pid}) was killed by signal 9" in str(box[0])
        with pytest.raises(WorkerDiedError):  # the engine stays failed, at once
            engine.step()
    finally:
        t0 = time.monotonic()
        llm.close()
        assert time.monotonic() - t0 < 30
    assert worker.poll() is not None


# -- the allocator's journal ------------------------------------------------------------------------------------------
def test_journal_replay_reproduces_maps_sharing_and_copy_on_write():
    with open_backend("host", page_size=PAGE) as backend:
        pools = [PagePool(backend, 16 * PAGE), PagePool(backend, 16 * PAGE)]
        tensors = [[VirtualTensor(pool, (4, 4 * PAGE // 4), torch.float32) for _ in range(2)] for pool in pools]
        journal = pools[0].start_journal()
        a, b = tensors[0]
        map_many([a, b], 0, 2)
        a.tensor[0, :8] = 1.0
        for t in (a, b):
            t.map_shared(5, t.page_at(0))
        a.map(8, 1)
        copy_on_write_many([a, b], [5])
        a.unmap(8)
        entries = journal.drain()
        replay(pools[1], entries)
        for t0, t1 in zip(tensors[0], tensors[1]):
            assert {v: t0.page_at(v) for v in t0.mapped_pages()} == {v: t1.page_at(v) for v in t1.mapped_pages()}
        assert pools[1].num_free == pools[0].num_free and pools[1].num_shared == pools[0].num_shared
        assert len(journal) == 0
        with pytest.raises(JournalMismatchError, match="already mapped"):  # replaying twice cannot fit
            replay(pools[1], entries)
        small = PagePool(backend, 2 * PAGE)
        VirtualTensor(small, (4, 4 * PAGE // 4), torch.float32)
        VirtualTensor(small, (4, 4 * PAGE // 4), torch.float32)
        with pytest.raises(JournalMismatchError, match="does not fit this pool of 2 pages"):
            replay(small, entries)
        for pool in pools + [small]:
            pool.close(force=True)


# -- the server ---------------------------------------------------------------------------------------------------------
def _workers_of(pid: int) -> list[int]:
    """Pids of vattn.tp_worker processes descending from `pid`."""
    parents, cmds = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmds[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue

    def descends(p: int) -> bool:
        while p > 1:
            p = parents.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p, c in cmds.items() if b"vattn.tp_worker" in c and descends(p)]


def test_server_with_tp2_answers_and_exits_nonzero_when_a_worker_dies(tiny_model):
    path = tiny_model("qwen2")
    with RemoteServer(path, "--tensor-parallel-size", "2", "--device", "cpu", "--kv-cache-memory", "4M",
                      "--max-model-len", "256") as srv:
        r = srv.post("/v1/completions", json={"model": srv.model_name, "prompt": "The 'assert' statement",
                                              "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        workers = _workers_of(srv.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        r = srv.post("/v1/completions", json={"model": srv.model_name, "prompt": "again", "max_tokens": 8})
        assert r.status_code >= 500
        code = srv.proc.wait(60)
        assert code == 1
        assert "WorkerDiedError" in srv.log() and "rank 1" in srv.log()


# -- the benchmark --------------------------------------------------------------------------------------------------
def test_bench_throughput_compares_tensor_parallel_sizes(tmp_path):
    from vattn.bench import throughput

    out = tmp_path / "t.json"
    throughput.main(["--model", "tiny", "--num-requests", "3", "--input-len", "12", "--output-len", "5",
                     "--engines", "vattention", "--tensor-parallel-size", "1,2", "--kv-memory", "4M",
                     "--max-num-seqs", "4", "--no-progress", "--no-plot", "--json", str(out)])
    d = json.loads(out.read_text())
    rows = {r["engine"]: r for r in d["results"]}
    assert list(rows) == ["vattention@64K", "vattention@64K/tp2"]
    assert [rows[k]["tensor_parallel_size"] for k in rows] == [1, 2]
    assert all(r["output_tokens"] == 3 * 5 and r["output_tokens_per_s"] > 0 for r in rows.values())
    assert d["token_check"]["compared"] == ["vattention@64K/tp2"] and d["token_check"]["mismatches"] == 0
    with pytest.raises(ValueError, match="--tensor-parallel-size: sizes must be >= 1"):
        throughput.main(["--model", "tiny", "--tensor-parallel-size", "0", "--no-progress", "--no-plot",
                         "--json", str(tmp_path / "x.json")])
