"""The engine in its own process: LLMEngine's interface, with the engine core running in a child process.

The child owns the model, the KV cache and the scheduler, and steps on its own: while it has unfinished requests it
runs one step after another and sends each step's outputs up the pipe, without waiting for the parent to ask for
them. Between two steps it takes the commands that came in (add, abort, stats), in order, and answers each one.
So the engine never sits idle while the server process turns the last step's outputs into SSE chunks, and
HTTP, SSE and tokenization in the server process run beside the steps instead of taking turns with them. The
tokenizer is loaded in both processes: the server tokenizes, the engine detokenizes.

`EngineProcess` answers LLMEngine's calls: `add_request`, `abort` and `stats` are a command and its answer (outputs
that arrive meanwhile wait for `step()`); `step()` returns the next step's outputs. A reader thread in the parent
empties the pipe as messages arrive, so neither side ever blocks on a full pipe.

Errors keep their meaning across the pipe: a ValueError raised by the engine (a bad prompt) is a ValueError here;
anything else, and a child that dies, is an EngineProcessError naming what happened. After a step fails the child
stops stepping until the parent's next call (`step()` resumes it).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import queue
import threading
from multiprocessing.connection import Connection

from vattn.config import EngineConfig
from vattn.engine import EngineStats
from vattn.kv_cache import KVStats
from vattn.outputs import RequestOutput
from vattn.sampling_params import SamplingParams

log = logging.getLogger("vattn.engine")


class EngineProcessError(RuntimeError):
    """The engine process failed, or is gone. `fatal`: the engine cannot take another step."""

    fatal = False


FATAL_ERRORS = ("WorkerDiedError",)  # engine errors after which it cannot go on (vattn.distributed)
_GONE = ("gone", None)  # what the reader thread queues when the pipe closes
_WAKE = ("wake", None)  # interrupt(): a waiting step() returns


def _core_main(conn: Connection, config: EngineConfig) -> None:
    """The child: build the engine, then step while there is work, answering commands between steps."""
    from vattn.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # e.g. a configuration the engine refuses: the parent re-raises it
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ok", {"max_model_len": engine.max_model_len, "spec": engine.spec, "stats": engine.stats()}))
    calls = {
        # several adds in one command: a burst of arrivals costs one answer, not one step each
        "add_many": lambda a: [None if e is None else _portable(e) for e in engine.add_requests(a)],
        "abort": engine.abort,
        "stats": lambda _: engine.stats(),
        "kv_stats": lambda _: engine.kv_stats(),
        "resume": lambda _: None,
    }
    paused = False  # after a failed step: wait for the parent before stepping again
    try:
        while True:
            # commands first; block for one only when there is nothing to step
            while conn.poll(0) or paused or not engine.has_unfinished_requests():
                try:
                    op, arg = conn.recv()
                except (EOFError, OSError):  # the parent is gone
                    return
                if op == "close":
                    return
                paused = False
                try:
                    conn.send(("ok", calls[op](arg)))
                except Exception as exc:
                    conn.send(("error", _portable(exc)))
            try:
                conn.send(("step", (engine.step(), engine.stats())))
            except Exception as exc:
                paused = True
                conn.send(("step_error", _portable(exc)))
    finally:
        engine.close()
        conn.close()


def _portable(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


class EngineProcess:
    """Drop-in for LLMEngine (the calls the server makes), backed by a child process. Not thread-safe: one caller."""

    def __init__(self, config: EngineConfig, start_timeout: float = 600.0):
        from vattn.loader import load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads, locks or CUDA state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_core_main, args=(child, config), name="vattn-engine-core", daemon=True)
        self._proc.start()
        child.close()
        self._inbox: queue.Queue = queue.Queue()  # messages from the child, in order (the reader thread's)
        self._steps: collections.deque = collections.deque()  # step results that came while waiting for an answer
        self._live: set[str] = set()
        self._closed = False
        self._paused = False
        self._reader = threading.Thread(target=self._read, name="vattn-engine-pipe", daemon=True)
        self._reader.start()
        try:
            info = self._inbox.get(timeout=start_timeout)
        except queue.Empty:
            self._kill()
            raise EngineProcessError(f"the engine process did not start within {start_timeout:.0f}s") from None
        info = self._unwrap(info)
        self.max_model_len: int = info["max_model_len"]
        self.spec = info["spec"]
        self._stats: EngineStats = info["stats"]
        log.info("engine process %d started", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # -- the calls ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        [error] = self.add_requests([dict(request_id=request_id, prompt=prompt, params=params,
                                          prompt_token_ids=prompt_token_ids, arrival_time=arrival_time)])
        if error is not None:
            raise error

    def add_requests(self, requests: list[dict]) -> list[Exception | None]:
        """LLMEngine.add_requests in one round trip; per request None or the error it raised (a ValueError for a
        bad prompt)."""
        errors = [None if e is None else self._error(e) for e in self._call("add_many", requests)]
        for a, e in zip(requests, errors):
            if e is None:
                self._live.add(a["request_id"])
        return errors

    def abort(self, request_id: str) -> RequestOutput | None:
        """The aborted request's output, or None when the engine does not know it (never added, or it finished
        meanwhile: its final output then comes from `step()`)."""
        out = self._call("abort", request_id)
        self._live.discard(request_id)
        return out

    def step(self) -> list[RequestOutput]:
        """The outputs of the engine's next step (it is probably computing already)."""
        if self._closed:
            raise EngineProcessError("the engine process is closed")
        if self._paused:  # the last step failed: the child waits to be told to go on
            self._paused = False
            self._call("resume")
        kind, payload = self._steps.popleft() if self._steps else self._next()
        while kind not in ("step", "step_error"):  # (an answer nobody waits for cannot come: one caller)
            if kind == "wake":
                return []
            kind, payload = self._next()
        if kind == "step_error":
            self._paused = True
            raise self._error(payload)
        outputs, self._stats = payload
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        return outputs

    def interrupt(self) -> None:
        """Make a step() that is waiting return [] now (any thread): the caller has a command for the engine, and
        sent at once it reaches the child before its next step instead of after it."""
        self._inbox.put(_WAKE)

    def has_unfinished_requests(self) -> bool:
        return bool(self._live)

    def stats(self) -> EngineStats:
        """The stats of the last step (every step sends them along); asks the engine when idle."""
        if not self._live and not self._closed:
            self._stats = self._call("stats")
        return self._stats

    def is_alive(self) -> bool:
        """Whether the engine process is running (False once closed, or if it died)."""
        return not self._closed and self._proc.is_alive()

    def kv_stats(self) -> KVStats:
        return self._call("kv_stats")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine process (it finishes its current step, closes the KV cache and exits)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.send(("close", None))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.error("engine process %d did not exit within %.0fs; killing it", self._proc.pid, timeout)
            self._kill()
        self._reader.join(5)
        self._conn.close()

    # -- the pipe -----------------------------------------------------------------------------------
    def _read(self) -> None:
        """Reader thread: every message from the child into the inbox, then _GONE once the pipe closes."""
        try:
            while True:
                self._inbox.put(self._conn.recv())
        except (EOFError, OSError, ValueError):
            self._inbox.put(_GONE)

    def _next(self) -> tuple:
        msg = self._inbox.get()
        if msg is _GONE or msg[0] == "gone":
            self._inbox.put(_GONE)  # every later call sees it too
            raise self._gone()
        return msg

    def _call(self, op: str, arg=None):
        if self._closed:
            raise EngineProcessError("the engine process is closed")
        try:
            self._conn.send((op, arg))
        except (OSError, ValueError) as exc:
            raise self._gone() from exc
        while True:
            msg = self._next()
            if msg[0] in ("step", "step_error"):
                self._steps.append(msg)  # for the next step() call
                continue
            if msg[0] == "wake":  # this call is what the interrupt was for
                continue
            return self._unwrap(msg)

    def _unwrap(self, msg: tuple):
        status, payload = msg
        if status == "gone":
            raise self._gone()
        if status == "ok":
            return payload
        raise self._error(payload)

    @staticmethod
    def _error(payload: tuple[str, str]) -> Exception:
        name, message = payload
        if name == "ValueError":  # the caller's mistake: keep its type so the server answers 400
            return ValueError(message)
        err = EngineProcessError(f"{name}: {message}")
        err.fatal = name in FATAL_ERRORS
        return err

    def _gone(self) -> EngineProcessError:
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return EngineProcessError(f"the engine process {self._proc.pid} is gone ({how})")

    def _kill(self) -> None:
        if self._proc.is_alive():
            os.kill(self._proc.pid, 9)
            self._proc.join(5)
