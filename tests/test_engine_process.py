"""EngineProcess: the engine in a child process answers like LLMEngine, keeps error types, and never hangs."""

from __future__ import annotations

import os
import signal

import pytest

from tests.test_engine import PAGE, greedy, prompts_for
from vattn.config import EngineConfig
from vattn.engine import LLMEngine
from vattn.engine_process import EngineProcess, EngineProcessError
from vattn.sampling_params import SamplingParams


def config(path: str, **kw) -> EngineConfig:
    kw.setdefault("kv_cache_memory", 4 << 20)
    return EngineConfig(model=path, device="cpu", page_size=PAGE, max_model_len=128, max_num_seqs=4, **kw)


def run(engine, requests) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt_token_ids=prompt, params=params)
    finals, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
        steps += 1
    return finals


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


def test_same_outputs_as_the_engine_in_process(path):
    prompts = prompts_for(21, 3)
    requests = [("a", prompts[0], greedy(9)), ("b", prompts[1], greedy(5, stop_token_ids=[7])),
                ("c", prompts[2], SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=6))]
    local = LLMEngine(config(path))
    try:
        want = run(local, requests)
    finally:
        local.close()
    remote = EngineProcess(config(path))
    try:
        assert run(remote, requests) == want and len(want) == 3
        st = remote.stats()
        assert st.num_running == 0 and st.generation_tokens == 9 + len(want["b"][0][0]) + 12
        assert remote.kv_stats().kind == "vattention" and remote.max_model_len == 128
        assert remote.spec.vocab_size > 0 and remote.tokenizer.decode(want["a"][0][0]) == want["a"][0][1]
    finally:
        remote.close()
    assert not remote._proc.is_alive() and remote._proc.exitcode == 0


def test_bad_requests_keep_their_error_type_and_abort_works(path):
    remote = EngineProcess(config(path))
    try:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            remote.add_request("bad", prompt_token_ids=[10**7])
        with pytest.raises(ValueError, match="already in use"):
            remote.add_request("x", prompt_token_ids=[5, 6, 7], params=greedy(50))
            remote.add_request("x", prompt_token_ids=[5, 6, 7], params=greedy(50))
        remote.step()
        out = remote.abort("x")
        assert out.finished and out.outputs[0].finish_reason == "abort" and not remote.has_unfinished_requests()
        assert remote.abort("x") is None
        assert run(remote, [("y", [5, 6, 7], greedy(3))])["y"][0][2] == "length"  # still serving
    finally:
        remote.close()


def test_a_refused_configuration_is_a_valueerror_in_the_parent(path):
    with pytest.raises(ValueError, match="set max_model_len <="):
        EngineProcess(config(path, kv_cache_memory=8 * 4 * PAGE).__class__(
            model=path, device="cpu", page_size=PAGE, max_model_len=512, kv_cache_memory=8 * 4 * PAGE))


def test_a_dead_engine_process_is_an_error_not_a_hang(path):
    remote = EngineProcess(config(path))
    try:
        remote.add_request("z", prompt_token_ids=[5, 6, 7], params=greedy(100))
        os.kill(remote.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessError, match="killed by signal 9"):
            remote.step()
    finally:
        remote.close()


def test_the_engine_process_steps_ahead_of_its_caller(path):
    """The child runs its steps without being asked: a request finishes while the parent does not call step(),
    its pages are free by then, and every output it made still comes out of step(), in order."""
    import time

    remote = EngineProcess(config(path))
    try:
        remote.add_request("w", prompt_token_ids=[5, 6, 7], params=greedy(12))
        def done(st):  # pages were mapped (finished rows keep theirs) and no live token holds one
            return st.mapped_bytes > 0 and st.used_bytes == 0

        deadline = time.monotonic() + 30
        while not done(remote.kv_stats()) and time.monotonic() < deadline:  # answered between the child's steps
            time.sleep(0.05)
        assert done(remote.kv_stats())  # ran and finished with no step() call from here
        seen = []
        while remote.has_unfinished_requests():
            seen += [len(o.outputs[0].token_ids) for o in remote.step()]
        assert seen == list(range(1, 13))  # one output per step, none lost, none out of order
        assert remote.abort("w") is None  # it finished on its own
    finally:
        remote.close()


def test_add_requests_is_one_round_trip_with_an_error_per_bad_request(path):
    remote = EngineProcess(config(path))
    try:
        errors = remote.add_requests([
            dict(request_id="ok1", prompt_token_ids=[5, 6, 7], params=greedy(3)),
            dict(request_id="bad", prompt_token_ids=[10**7], params=greedy(3)),
            dict(request_id="ok2", prompt_token_ids=[8, 9], params=greedy(4)),
        ])
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], ValueError) and "outside the vocabulary" in str(errors[1])
        finals = {}
        while remote.has_unfinished_requests():
            finals.update({o.request_id: len(o.outputs[0].token_ids) for o in remote.step() if o.finished})
        assert finals == {"ok1": 3, "ok2": 4}
    finally:
        remote.close()
