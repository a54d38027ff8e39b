"""The bridge between asyncio handlers and the (not thread-safe) engine, which runs on one background thread.

Handlers never touch the engine. They queue commands (add, abort); the engine thread drains them between
steps, steps while work remains, and hands every RequestOutput to the asyncio queue of the `RequestGroup`
that asked for it with `loop.call_soon_threadsafe`. When nothing is left to do it sleeps on an Event.

Admission is bookkept here, on the event loop, not in the scheduler: `num_waiting` counts the engine
requests accepted whose first output has not come back yet (queued commands included), and a group that
would take it past `max_waiting` is refused (`Overloaded`, a 503 with Retry-After). `drain()` is the first
half of a graceful shutdown: refuse new work, let running requests finish, then fail what is left.
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


class ShuttingDown(EngineError):
    """The server is shutting down: the request was refused, or did not finish within the grace period."""


class Overloaded(RuntimeError):
    """More requests wait than the server allows; the client should retry later."""


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
class _FailAll:
    error: EngineError
    done: threading.Event


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

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None, stats_interval: float = 0.05,
                 max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.num_waiting = 0  # event-loop side: accepted engine requests with no output yet
        self.accepting = True
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
        self.dead: BaseException | None = None  # set if the engine thread itself crashed, or the engine is lost
        self.on_fatal = None  # called (engine thread) with an error that ends the engine, e.g. a dead TP worker

    # -- called from the event loop (any thread) -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.accepting

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def admit(self, count: int) -> None:
        """Reserve room for `count` more waiting requests (event loop only), or raise Overloaded/ShuttingDown."""
        if not self.accepting or self._stopping:
            raise ShuttingDown("the server is shutting down: the engine is not running new requests")
        if self.max_waiting is not None and self.num_waiting + count > self.max_waiting:
            raise Overloaded(f"the server is overloaded: {self.num_waiting} requests are waiting (the bound is "
                             f"{self.max_waiting}); retry later")
        self.num_waiting += count

    def release(self, count: int) -> None:
        self.num_waiting -= count

    async def drain(self, grace: float) -> int:
        """Refuse new requests; wait up to `grace` seconds for the running ones; fail the rest with ShuttingDown
        (their KV cache freed). Returns how many were failed."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self._live or self._commands) and loop.time() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        left = len(self._live)
        if left and self._thread.is_alive():
            done = threading.Event()
            self._commands.append(_FailAll(ShuttingDown(
                f"the server is shutting down: the request did not finish within the {grace:g}s grace period"), done))
            self._wake.set()
            await loop.run_in_executor(None, done.wait, 10.0)
        return left

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, fail what is still in flight, close the engine (frees the KV cache)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        step_running = self._thread.is_alive()
        if step_running:  # closing now would unmap KV pages under a running step: leave them to process exit
            log.error("engine thread did not stop within %.1fs; leaving the KV cache to the process exit", timeout)
        for rid, tracked in list(self._live.items()):
            tracked.group._deliver(_Failure(rid, ShuttingDown("the server is shutting down")))
        self._live.clear()
        for cmd in self._commands:
            if isinstance(cmd, _FailAll):
                cmd.done.set()
            elif isinstance(cmd, _Add):
                cmd.group._loop.call_soon_threadsafe(_resolve, cmd.added, ShuttingDown("the server is shutting down"))
        self._commands.clear()
        if not step_running:
            self.engine.close()
            log.info("engine stopped, KV cache closed")

    def _submit(self, cmd) -> None:
        if self._stopping or self.dead is not None:
            raise EngineError("the engine is not running")
        self._commands.append(cmd)
        self._wake.set()
        interrupt = getattr(self.engine, "interrupt", None)  # an engine process steps on its own: the command
        if interrupt is not None:                            # goes in before its next step, not after
            interrupt()

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping and self.dead is None:
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
                tracked.group._deliver(_Failure(rid, EngineError(
                    f"the engine thread crashed ({type(exc).__name__}); see the server log")))
            self._live.clear()

    def _drain(self) -> int:
        n = 0
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, _Add):
                adds = [cmd]  # a burst of arrivals goes to the engine together
                while self._commands and isinstance(self._commands[0], _Add):
                    adds.append(self._commands.popleft())
                self._add(adds)
                n += len(adds) - 1
            elif isinstance(cmd, _FailAll):
                self._fail_all(cmd)
            else:
                self._abort(cmd.request_id)
            n += 1
        return n

    def _fail_all(self, cmd: _FailAll) -> None:
        for rid, tracked in list(self._live.items()):
            out = self.engine.abort(rid)  # frees its KV cache
            if out is not None:
                self._finished(out, None)
            tracked.group._deliver(_Failure(rid, cmd.error))
        self._live.clear()
        cmd.done.set()

    def _add(self, cmds: list[_Add]) -> None:
        """Add requests to the engine together (an engine in its own process takes them in one round trip)."""
        now = time.time()
        args = [dict(request_id=c.request_id, prompt=c.prompt, params=c.params, prompt_token_ids=c.prompt_token_ids,
                     arrival_time=now) for c in cmds]
        try:  # per request None or why it was refused (ValueError: a bad prompt; the handler answers 400)
            errors = self.engine.add_requests(args)
        except Exception as exc:  # the engine process is gone: every one of them fails with its error
            errors = [exc] * len(args)
        for cmd, exc in zip(cmds, errors):
            if exc is None:
                self._live[cmd.request_id] = _Tracked(cmd.group)
            cmd.group._loop.call_soon_threadsafe(_resolve, cmd.added, exc)

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
                tracked.group._deliver(_Failure(rid, EngineError(
                    f"the engine failed while running this request ({type(exc).__name__}); see the server log")))
                self.metrics.request_errors.inc()
            self._live.clear()
            if getattr(exc, "fatal", False):  # the engine cannot go on (a tensor-parallel worker died): stop
                self.dead, self.accepting = exc, False
                log.error("the engine cannot continue: %s", exc)
                if self.on_fatal is not None:
                    self.on_fatal(exc)
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

    Use it as `async with RequestGroup(engine, n) as g:`; leaving the block aborts whatever has not finished
    (a client that went away, an error, a cancelled task), which frees its KV cache. Creating the group admits
    its `num_requests` requests against the engine's waiting bound (Overloaded / ShuttingDown otherwise); each
    one stops counting as waiting once its first output arrives, fails or is aborted.
    """

    def __init__(self, engine: AsyncEngine, num_requests: int = 0):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()
        engine.admit(num_requests)
        self._reserved = num_requests  # admitted, not yet added
        self._waiting: set[str] = set()  # added, no output yet

    async def add(self, request_id: str, prompt: str | None, params: SamplingParams,
                  prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; returns once the engine accepted it. Raises the engine's ValueError for a bad prompt."""
        if self._reserved:
            self._reserved -= 1
        else:
            self._engine.admit(1)
        added = self._loop.create_future()
        self.unfinished.add(request_id)
        self._waiting.add(request_id)
        try:
            self._engine._submit(_Add(request_id, prompt, params, prompt_token_ids, self, added))
            await added
        except ValueError:
            self.unfinished.discard(request_id)
            self._started(request_id)
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
        self._engine.release(len(self._waiting) + self._reserved)
        self._waiting.clear()
        self._reserved = 0

    def _started(self, request_id: str) -> None:  # event loop
        if request_id in self._waiting:
            self._waiting.discard(request_id)
            self._engine.release(1)

    def _receive(self, item) -> None:  # event loop
        self._started(item.request_id)
        self._queue.put_nowait(item)

    def _deliver(self, item) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._receive, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()
