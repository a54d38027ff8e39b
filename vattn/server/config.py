"""What one HTTP deployment allows: bounds on a request, locking, and shutdown. Every field is a `vattn serve` flag.

The bounds keep one request from taking the server down (memory, event-loop time); defaults follow OpenAI's
documented limits where there are some (n <= 128), and otherwise leave room for any legitimate request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

API_KEY_ENV = "VATTN_API_KEY"


@dataclass
class ServerConfig:
    api_key: str | None = None  # require `Authorization: Bearer KEY` on every route but /health and /metrics; env VATTN_API_KEY
    max_request_body_bytes: int = 8 << 20  # larger request bodies get 413
    max_n: int = 128  # the most n, best_of or beam width one request may ask for
    max_stop_strings: int = 16  # the most stop strings one request may give
    max_stop_str_len: int = 4096  # the longest stop string, in characters
    max_waiting_requests: int | None = 1024  # prompts accepted but not yet started; beyond it 503 + Retry-After
    trust_request_chat_template: bool = False  # render a client's `chat_template` (sandboxed, in a child process)
    chat_template_timeout: float = 5.0  # seconds one client template may render for
    chat_template_memory: int = 1 << 30  # bytes of address space the template child process may add
    shutdown_timeout: float = 5.0  # seconds running requests get to finish after SIGTERM/SIGINT
    engine_process: bool = True  # run the engine core in its own process (else on a thread of the server's)

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        for name in ("max_request_body_bytes", "max_n", "max_stop_strings", "max_stop_str_len",
                     "chat_template_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1 or None, got {self.max_waiting_requests}")
        for name in ("chat_template_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
