"""The engine in its own process: LLMEngine's interface, with the engine core running in a child process.

The server's engine thread drives an engine one call at a time (add_request, step, abort, stats). `EngineProcess`
answers the same calls by sending them over a pipe to a child process that owns the model, the KV cache and the
scheduler, and waiting for the reply. While a step computes in the child, the parent's thread waits on the pipe
without holding the interpreter lock, so HTTP, SSE and tokenization in the server process run beside the step
instead of taking turns with it. The tokenizer is loaded in both processes: the server tokenizes, the engine
detokenizes.

Errors keep their meaning across the pipe: a ValueError raised by the engine (a bad prompt) is a ValueError here;
anything else, and a child that dies, is an EngineProcessError naming what happened.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
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


def _core_main(conn: Connection, config: EngineConfig) -> None:
    """The child: build the engine, then answer one call at a time until told to close or the parent goes."""
    from vattn.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # e.g. a configuration the engine refuses: the parent re-raises it
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ok", {"max_model_len": engine.max_model_len, "spec": engine.spec, "stats": engine.stats()}))
    calls = {
        "add": lambda a: engine.add_request(**a),
        "abort": engine.abort,
        "step": lambda _: (engine.step(), engine.stats()),
        "stats": lambda _: engine.stats(),
        "kv_stats": lambda _: engine.kv_stats(),
    }
    try:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if op == "close":
                break
            try:
                reply = ("ok", calls[op](arg))
            except Exception as exc:
                reply = ("error", _portable(exc))
            conn.send(reply)
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
        if not self._conn.poll(start_timeout):
            self._kill()
            raise EngineProcessError(f"the engine process did not start within {start_timeout:.0f}s")
        info = self._recv()
        self.max_model_len: int = info["max_model_len"]
        self.spec = info["spec"]
        self._stats: EngineStats = info["stats"]
        self._live: set[str] = set()
        self._closed = False
        log.info("engine process %d started", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # -- the calls ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        self._call("add", dict(request_id=request_id, prompt=prompt, params=params,
                               prompt_token_ids=prompt_token_ids, arrival_time=arrival_time))
        self._live.add(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        out = self._call("abort", request_id)
        self._live.discard(request_id)
        return out

    def step(self) -> list[RequestOutput]:
        outputs, self._stats = self._call("step")
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        return outputs

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
        """Stop the engine process (it finishes its current call, closes the KV cache and exits)."""
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
        self._conn.close()

    # -- the pipe -----------------------------------------------------------------------------------
    def _call(self, op: str, arg=None):
        if self._closed:
            raise EngineProcessError("the engine process is closed")
        try:
            self._conn.send((op, arg))
        except (OSError, ValueError) as exc:
            raise self._gone() from exc
        return self._recv()

    def _recv(self):
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._gone() from exc
        if status == "ok":
            return payload
        name, message = payload
        if name == "ValueError":  # the caller's mistake: keep its type so the server answers 400
            raise ValueError(message)
        err = EngineProcessError(f"{name}: {message}")
        err.fatal = name in FATAL_ERRORS
        raise err

    def _gone(self) -> EngineProcessError:
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return EngineProcessError(f"the engine process {self._proc.pid} is gone ({how})")

    def _kill(self) -> None:
        if self._proc.is_alive():
            os.kill(self._proc.pid, 9)
            self._proc.join(5)
