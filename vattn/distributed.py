"""Tensor-parallel process-group state: who this rank is, and the collectives the model and the engine use.

Two groups over the same ranks:
  group    the model's collectives (all-reduce after row-parallel layers, all-gather of the vocabulary-parallel
           logits): NCCL on CUDA, gloo on CPU; its timeout bounds how long a rank waits on a silent peer.
  control  rank 0's messages to the workers (each step's plan, stats requests, shutdown): always gloo, on CPU
           objects; workers wait on it between steps, so its timeout is long (an idle server is not an error).

Rank 0 runs the engine; ranks 1..N-1 run `vattn.tp_worker`. A peer that dies makes gloo's next collective fail at
once (the TCP connection closes); `failure()` turns that into a WorkerDiedError that names the worker.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("VATTN_TP_TIMEOUT", 300)))
CONTROL_TIMEOUT = datetime.timedelta(days=30)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone (or a collective with it failed): the engine cannot go on."""

    fatal = True  # the server stops (non-zero exit) rather than failing request after request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous of our own launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group of `world_size` ranks."""

    rank: int
    world_size: int
    device: torch.device
    group: object  # the model's collectives
    control: object  # rank 0 -> workers messages (gloo)
    workers: list = field(default_factory=list)  # rank 0 under our launcher: subprocess.Popen of ranks 1..N-1
    broken: BaseException | None = None  # set once a collective failed: every later call raises it

    # -- the model's collectives ----------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks, in place; returns it."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` (same shape) along the last dimension, rank order."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    # -- rank 0 -> workers ----------------------------------------------------------------------
    def broadcast(self, message=None):
        """Rank 0 sends `message` (any picklable object) to every worker; a worker receives and returns it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the workers)."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    # -- failure and shutdown --------------------------------------------------------------------
    def dead_workers(self) -> list[str]:
        """'rank R (pid P) exited with ...' for each worker process of ours that has exited."""
        dead = []
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                dead.append(f"rank {rank} (pid {proc.pid}) {how}")
        return dead

    def failure(self, exc: BaseException) -> BaseException:
        """The error to raise for `exc`, raised by a step with collectives: a WorkerDiedError naming the dead
        worker when one is gone or a collective failed; `exc` itself when it is the engine's own error."""
        if self.broken is not None:
            return self.broken
        dead = self.dead_workers()
        if not dead and self.workers and isinstance(exc, RuntimeError):
            for proc in self.workers:  # the peer's socket closed a moment before the process is reaped
                try:
                    proc.wait(2.0)
                except Exception:  # still running: not the cause
                    pass
            dead = self.dead_workers()
        if dead:
            err = WorkerDiedError(f"tensor-parallel worker {'; '.join(dead)}: the engine cannot continue "
                                  f"({type(exc).__name__}: {exc})")
        elif isinstance(exc, RuntimeError) and not isinstance(exc, ValueError):
            err = WorkerDiedError(f"a tensor-parallel collective failed: {type(exc).__name__}: {exc}")
        else:
            return exc
        self.broken = err
        return err

    def check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (rank 0: send 'shutdown' first) and leave the process group. Never hangs: workers
        that do not exit within `timeout` are killed."""
        if self.rank == 0 and self.broken is None:
            try:
                self.broadcast(("shutdown", None))
            except Exception:  # a worker is already gone: kill the rest below
                pass
        for proc in self.workers:
            try:
                proc.wait(timeout)
            except Exception:
                proc.kill()
                proc.wait(5)
        self.workers = []
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a peer is gone; the process exits soon anyway
                pass


def init_group(rank: int, world_size: int, device_type: str, init_method: str,
               join_timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> TPGroup:
    """Join the group: blocks until all `world_size` ranks have joined, at most `join_timeout`."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=join_timeout)
    group = dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, world_size, device, group, control)
