"""The bridge between asyncio handlers and the (not thread-safe) engine, which runs on one background thread.

Handlers never touch the engine. They queue commands (add, abort); the engine thread drains them between
steps, steps while work remains, and hands every RequestOutput to the asyncio queue of the `RequestGroup`
that asked for it with `loop.call_soon_threadsafe`. When nothing is left to do it sleeps on an Event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vattn.engine import EngineStats, LLMEngine
from vattn.outputs import RequestOutput
from vattn.sampling_params import SamplingParams
from vattn.server.metrics import ServerMetrics

log = logging.getLogger("vattn.server")


class EngineError(RuntimeError):
    """The engine failed while running a request (a step raised); the request is gone."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams
    prompt_token_ids: list[int] | None
    group: RequestGroup
    added: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Failure:
    request_id: str
    error: BaseException


@dataclass
class _Tracked:
    """What the engine thread remembers about a live request, for metrics and the log line."""

    group: RequestGroup
    num_tokens: int = 0
    last_token_time: float | None = None


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the handler went away (cancelled) while we were adding
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class AsyncEngine:
    """Owns the engine thread. Start it once; `shutdown()` stops the thread and closes the KV cache."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None, stats_interval: float = 0.05):
        self.engine = engine
        self.metrics = metrics or ServerMetrics(engine.config.kv_cache)
        self.stats_interval = stats_interval
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._live: dict[str, _Tracked] = {}
        self._thread = threading.Thread(target=self._run, name="vattn-engine", daemon=True)
        self._last_stats = 0.0
        self.stats: EngineStats = engine.stats()
        self.metrics.set_stats(self.stats)
        self.dead: BaseException | None = None  # set if the engine thread itself crashed

    # -- called from the event loop (any thread) -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, fail what is still in flight, close the engine (frees the KV cache)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.1fs; closing anyway", timeout)
        for rid, tracked in list(self._live.items()):
            tracked.group._deliver(_Failure(rid, EngineError("the server is shutting down")))
        self._live.clear()
        for cmd in self._commands:
            if isinstance(cmd, _Add):
                cmd.group._loop.call_soon_threadsafe(_resolve, cmd.added, EngineError("the server is shutting down"))
        self._commands.clear()
        self.engine.close()
        log.info("engine stopped, KV cache closed")

    def _submit(self, cmd) -> None:
        if self._stopping or self.dead is not None:
            raise EngineError("the engine is not running")
        self._commands.append(cmd)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                if self._drain():
                    self._publish_stats(force=True)  # adds and aborts show in /metrics at once
                if not self.engine.has_unfinished_requests():
                    self._publish_stats(force=True)
                    self._wake.wait()
                    continue
                self._step()
        except BaseException as exc:  # a bug in this loop: fail everyone rather than hang them
            log.exception("engine thread crashed")
            self.dead = exc
            for rid, tracked in list(self._live.items()):
                tracked.group._deliver(_Failure(rid, EngineError(f"engine thread crashed: {exc}")))
            self._live.clear()

    def _drain(self) -> int:
        n = 0
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort(cmd.request_id)
            n += 1
        return n

    def _add(self, cmd: _Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, prompt_token_ids=cmd.prompt_token_ids,
                                    arrival_time=time.time())
        except Exception as exc:  # ValueError: a bad prompt; the handler turns it into a 400
            cmd.group._loop.call_soon_threadsafe(_resolve, cmd.added, exc)
            return
        self._live[cmd.request_id] = _Tracked(cmd.group)
        cmd.group._loop.call_soon_threadsafe(_resolve, cmd.added, None)

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        tracked = self._live.pop(request_id, None)
        if out is not None:
            self._finished(out, tracked)
            if tracked is not None:
                tracked.group._deliver(out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the %d requests in flight", len(self._live))
            for rid, tracked in list(self._live.items()):
                try:
                    self.engine.abort(rid)
                except Exception:  # the engine may be in a bad state; the request is lost either way
                    log.exception("abort of %s after a failed step also failed", rid)
                tracked.group._deliver(_Failure(rid, EngineError(f"engine step failed: {exc!r}")))
                self.metrics.request_errors.inc()
            self._live.clear()
            return
        now = time.time()
        if outputs:
            self.metrics.step_batch.observe(len(outputs))
        for out in outputs:
            tracked = self._live.get(out.request_id)
            if tracked is None:
                continue
            n = sum(len(o.token_ids) for o in out.outputs)
            if n > tracked.num_tokens:
                if tracked.last_token_time is None:
                    if out.metrics.first_token_time is not None:
                        self.metrics.ttft.observe(out.metrics.first_token_time - out.metrics.arrival_time)
                else:
                    self.metrics.itl.observe(now - tracked.last_token_time)
                tracked.num_tokens, tracked.last_token_time = n, now
            if out.finished:
                del self._live[out.request_id]
                self._finished(out, tracked)
            tracked.group._deliver(out)
        self._publish_stats()

    def _finished(self, out: RequestOutput, tracked: _Tracked | None) -> None:
        m = out.metrics
        latency = (m.finished_time or time.time()) - m.arrival_time
        reason = out.outputs[0].finish_reason if out.outputs else "abort"
        self.metrics.e2e.observe(latency)
        self.metrics.request_success.labels(finished_reason=reason or "abort").inc()
        log.info("request %s: prompt_tokens=%d output_tokens=%d finish_reason=%s latency=%.3fs preemptions=%d",
                 out.request_id, len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                 ",".join(sorted({o.finish_reason or "abort" for o in out.outputs})), latency, m.num_preemptions)

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_stats >= self.stats_interval:
            self.stats = self.engine.stats()
            self.metrics.set_stats(self.stats)
            self._last_stats = now


class RequestGroup:
    """The engine requests of one HTTP call. Their outputs arrive on one asyncio queue, in engine order.

    Use it as `async with RequestGroup(engine) as g:`; leaving the block aborts whatever has not finished
    (a client that went away, an error, a cancelled task), which frees its KV cache.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()

    async def add(self, request_id: str, prompt: str | None, params: SamplingParams,
                  prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; returns once the engine accepted it. Raises the engine's ValueError for a bad prompt."""
        added = self._loop.create_future()
        self.unfinished.add(request_id)
        try:
            self._engine._submit(_Add(request_id, prompt, params, prompt_token_ids, self, added))
            await added
        except ValueError:
            self.unfinished.discard(request_id)
            raise

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every RequestOutput of this group's requests until all have finished; EngineError if one failed."""
        while self.unfinished:
            item = await self._queue.get()
            if isinstance(item, _Failure):
                self.unfinished.discard(item.request_id)
                raise item.error
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        for rid in self.unfinished:
            try:
                self._engine.abort(rid)
            except EngineError:
                break  # the engine is gone; nothing left to free
        self.unfinished.clear()

    def _deliver(self, item) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()
