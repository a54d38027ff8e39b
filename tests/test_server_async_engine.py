"""AsyncEngine in-process, on a real engine and tiny model: the engine thread, failures, aborts, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vattn.config import EngineConfig
from vattn.engine import LLMEngine
from vattn.sampling_params import SamplingParams
from vattn.server.async_engine import AsyncEngine, EngineError, RequestGroup


@pytest.fixture
def async_engine(tiny_model):
    engine = LLMEngine(EngineConfig(model=tiny_model("llama"), max_model_len=96, max_num_seqs=4,
                                    kv_cache_memory=2 << 20, device="cpu"))
    ae = AsyncEngine(engine)
    ae.start()
    yield ae
    ae.shutdown()


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _wait_idle(ae: AsyncEngine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = ae.stats
        if s.num_running == 0 and s.num_waiting == 0 and s.kv.live_tokens == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {ae.stats}")


def test_outputs_are_cumulative_and_match_the_engine(async_engine):
    async def main():
        async with RequestGroup(async_engine) as g:
            await g.add("r1", "Hello there", _params(6))
            await g.add("r2", "General Kenobi", _params(4))
            return [o async for o in g.outputs()]

    outs = asyncio.run(main())
    finals = {o.request_id: o for o in outs if o.finished}
    assert set(finals) == {"r1", "r2"}
    assert len(finals["r1"].outputs[0].token_ids) == 6 and len(finals["r2"].outputs[0].token_ids) == 4
    r1 = [o.outputs[0].text for o in outs if o.request_id == "r1"]
    assert all(b.startswith(a) for a, b in zip(r1, r1[1:]))  # cumulative text
    assert async_engine.metrics.ttft._sum.get() > 0
    _wait_idle(async_engine)


def test_bad_prompt_raises_value_error_and_engine_keeps_going(async_engine):
    async def main():
        async with RequestGroup(async_engine) as g:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await g.add("bad", None, _params(2), prompt_token_ids=[1, 10**6])
            with pytest.raises(ValueError, match="max_model_len"):
                await g.add("long", None, _params(2), prompt_token_ids=[5] * 96)
            await g.add("good", "fine", _params(2))
            return [o async for o in g.outputs()]

    assert asyncio.run(main())[-1].finished


def test_step_failure_fails_its_requests_then_serving_resumes(async_engine):
    engine = async_engine.engine
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = flaky_step

    async def main():
        async with RequestGroup(async_engine) as g:
            await g.add("doomed", "Hello", _params(20))
            # the client learns what happened, not the exception's text (that goes to the log)
            with pytest.raises(EngineError, match=r"engine failed while running this request \(RuntimeError\)"):
                async for _ in g.outputs():
                    pass
        async with RequestGroup(async_engine) as g:
            await g.add("after", "Hello", _params(3))
            return [o async for o in g.outputs()]

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert async_engine.metrics.request_errors._value.get() == 1
    _wait_idle(async_engine)  # the failed request's KV was freed


def test_leaving_the_group_aborts_and_frees_kv(async_engine):
    engine = async_engine.engine
    real_step, gate = engine.step, threading.Semaphore(3)  # the engine may take 3 steps, then waits for us

    def gated_step():
        gate.acquire()
        return real_step()

    engine.step = gated_step

    async def main():
        async with RequestGroup(async_engine) as g:
            await g.add("walk-away", "Keep going", _params(80))
            async for out in g.outputs():
                if len(out.outputs[0].token_ids) >= 2:
                    break
            assert not out.finished
        # leaving the block queued the abort; let the engine loop drain it
        for _ in range(100):
            gate.release()

    asyncio.run(main())
    aborted = async_engine.metrics.request_success.labels(finished_reason="abort")._value
    deadline = time.monotonic() + 10
    while aborted.get() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aborted.get() == 1
    assert _wait_idle(async_engine).kv.used_bytes == 0


def test_event_loop_stays_responsive_while_the_engine_computes(async_engine):
    """The engine runs on its own thread: the loop keeps ticking while the engine computes."""
    engine = async_engine.engine
    real_step = engine.step

    def slow_step():  # 10 ms of compute per step at least
        t = time.perf_counter()
        out = real_step()
        while time.perf_counter() - t < 0.01:
            pass
        return out

    engine.step = slow_step

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        async with RequestGroup(async_engine) as g:
            await g.add("busy", "Compute", _params(20))
            n = len([o async for o in g.outputs()])
        t.cancel()
        return ticks, n

    ticks, n = asyncio.run(main())
    assert n == 20 and ticks >= n  # >= 200 ms of busy engine thread; a blocked loop would not tick at all


def test_shutdown_fails_in_flight_requests_and_closes(async_engine):
    async def main():
        async with RequestGroup(async_engine) as g:
            await g.add("inflight", "Still going", _params(80))
            agen = g.outputs()
            await agen.__anext__()
            await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)
            with pytest.raises(EngineError, match="shutting down"):
                async for _ in agen:
                    pass
            with pytest.raises(EngineError, match="not running"):
                await g.add("late", "x", _params(2))

    asyncio.run(main())
    assert not async_engine.is_running


def test_shutdown_never_closes_the_engine_under_a_running_step(tiny_model):
    """Issue 13 #9: a step still running after the join timeout must not have its KV pages unmapped under it."""
    engine = LLMEngine(EngineConfig(model=tiny_model("llama"), max_model_len=96, max_num_seqs=4,
                                    kv_cache_memory=2 << 20, device="cpu"))
    in_step, release = threading.Event(), threading.Event()
    real_step, closed = engine.step, []

    def slow_step():
        in_step.set()
        release.wait(10)
        return real_step()

    engine.step = slow_step
    real_close = engine.close
    engine.close = lambda: closed.append(True) or real_close()
    ae = AsyncEngine(engine)
    ae.start()

    async def main():
        async with RequestGroup(ae) as g:
            await g.add("r", "Hello", _params(4))
            in_step.wait(10)
            ae.shutdown(timeout=0.2)  # the step is still running
            assert not closed and engine.kv.tensors  # the KV cache is still mapped
    try:
        asyncio.run(main())
    finally:
        release.set()
        ae._thread.join(10)
        real_close()
