"""Rendering a client's chat template with limits, off the event loop.

A template is a program: `{% for a in range(99999) %}{% for b in range(99999) %}` never ends, and
`{{ 'x' * 10**9 }}` takes gigabytes. So a client template renders in a child process (jinja2's sandbox,
through transformers, see `vattn.chat_template.sandbox_main`) whose address space is capped, and the
server waits for it at most `timeout` seconds; a child that overruns is killed and a fresh one started
for the next render. Renders go one at a time (a lock); the waiting happens on a thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from vattn.chat_template import ChatTemplateError

log = logging.getLogger("vattn.server")

_START_TIMEOUT = 120.0  # seconds for a fresh child to import jinja2 and transformers' helpers
_CRASHED = "the chat template crashed its render process (out of memory?)"


class TemplateSandbox:
    def __init__(self, timeout: float, memory_bytes: int):
        self.timeout, self.memory_bytes = timeout, memory_bytes
        self._proc: subprocess.Popen | None = None
        self._reader: Connection | None = None
        self._writer: Connection | None = None
        self._lock = threading.Lock()  # one render at a time (held on a worker thread, not the loop)

    def start(self) -> None:
        """Start the child now (it takes a few seconds), rather than on the first client template."""
        with self._lock:
            self._ensure_child()

    async def render(self, template: str, conversation: list[dict], add_generation_prompt: bool,
                     variables: dict[str, str], max_chars: int) -> str:
        """The rendered prompt, or ChatTemplateError (a bad template, a timeout, memory exhausted)."""
        job = json.dumps([template, conversation, add_generation_prompt, variables, max_chars]).encode()
        return await asyncio.get_running_loop().run_in_executor(None, self._render_blocking, job)

    def close(self) -> None:
        with self._lock:
            self._kill()

    # -- on a worker thread ----------------------------------------------------------------------------
    def _render_blocking(self, job: bytes) -> str:
        with self._lock:
            self._ensure_child()
            try:
                self._writer.send_bytes(job)
                ready = self._reader.poll(self.timeout)
                reply = json.loads(self._reader.recv_bytes()) if ready else None
            except (OSError, EOFError):
                self._kill()
                raise ChatTemplateError(_CRASHED) from None
            if reply is None:
                self._kill()
                log.warning("a client chat template ran past %.1fs; its render process was killed", self.timeout)
                raise ChatTemplateError(f"the chat template did not finish rendering within {self.timeout:g}s")
            if reply[0] != "ok" and "out of memory" in reply[1]:
                self._kill()  # a MemoryError may leave the child unwell: start afresh next time
        if reply[0] == "ok":
            return reply[1]
        raise ChatTemplateError(reply[1])

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._kill()
        code = f"from vattn.chat_template import sandbox_main; sandbox_main({int(self.memory_bytes)})"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        reader = Connection(os.dup(proc.stdout.fileno()), writable=False)
        writer = Connection(os.dup(proc.stdin.fileno()), readable=False)
        proc.stdout.close()
        proc.stdin.close()
        try:
            started = reader.poll(_START_TIMEOUT) and reader.recv_bytes() == b'["ready"]'
        except (OSError, EOFError):
            started = False
        if not started:
            proc.kill()
            proc.wait()
            reader.close()
            writer.close()
            raise ChatTemplateError("the chat template sandbox process did not start")
        self._proc, self._reader, self._writer = proc, reader, writer

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._reader.close()
            self._writer.close()
        self._proc = self._reader = self._writer = None
