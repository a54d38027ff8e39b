"""Tensor-parallel workers: how rank 0 starts them, and the loop ranks 1..N-1 run.

One scheduler (the vLLM design): rank 0 runs the whole engine (scheduler, KV manager, sampler, detokenizer). Each
step it broadcasts a plan: the KV manager's memory operations since the last step (vAttention: the page pool's
journal of maps, shares, unmaps and copy-on-write copies; paged: block copies) and the step's inputs (token ids,
positions, the attention layout). A worker replays the operations on its own KV cache, a twin of rank 0's (same
kind, same page or block count, its share of the kv heads), so the same pages sit at the same places on every rank,
then runs the same forward pass on its shard of the weights; the model's all-reduces and the logits' all-gather
keep the ranks in step. Only rank 0 samples.

Starting the workers
  our launcher   LLM(tensor_parallel_size=N) / `vattn serve --tensor-parallel-size N`: rank 0 starts N-1
                 `python -m vattn.tp_worker` subprocesses that meet it at a free port on 127.0.0.1. They die with
                 rank 0 (PR_SET_PDEATHSIG, and a closed connection ends their wait).
  torchrun       `torchrun --nproc-per-node N -m vattn.cli serve --tensor-parallel-size N ...` (or any script that
                 builds LLM(tensor_parallel_size=N)): RANK / WORLD_SIZE are set; rank 0 runs the engine, the other
                 ranks run the worker loop inside the engine's constructor and exit when rank 0 closes.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta

import torch

from vattn.config import EngineConfig
from vattn.distributed import TPGroup, free_port, init_group

log = logging.getLogger("vattn.tp")

JOIN_TIMEOUT = timedelta(seconds=float(os.environ.get("VATTN_TP_JOIN_TIMEOUT", 120)))


def check_world(n: int, device: torch.device) -> None:
    """ValueError when N ranks cannot run here: on CUDA one GPU per rank, on CPU at most one rank per core."""
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if n > have and "WORLD_SIZE" not in os.environ:  # torchrun across nodes: each node checks its own share
            raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs, but {have} are visible")
    else:
        cores = os.cpu_count() or 1
        if n > cores:
            raise ValueError(f"tensor_parallel_size={n} is more than this machine's {cores} CPU cores (on CPU each "
                             "rank needs a core of its own)")


def start_group(config: EngineConfig, device: torch.device) -> TPGroup:
    """Rank 0's side: join a group of config.tensor_parallel_size ranks, starting the workers unless torchrun did.

    Under torchrun, a rank other than 0 runs the worker loop here and exits (SystemExit(0)) when rank 0 closes.
    """
    n = config.tensor_parallel_size
    check_world(n, device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != n:
            raise ValueError(f"tensor_parallel_size={n} but torchrun started WORLD_SIZE={world} processes")
        tp = init_group(rank, n, device.type, "env://", JOIN_TIMEOUT)
        if rank != 0:
            run_worker(config, tp)
            raise SystemExit(0)
        return tp
    init_method = f"tcp://127.0.0.1:{free_port()}"
    args = ["--world-size", str(n), "--init-method", init_method, "--device-type", device.type,
            "--config", json.dumps(dataclasses.asdict(config))]
    procs = [subprocess.Popen([sys.executable, "-m", "vattn.tp_worker", "--rank", str(r), *args])
             for r in range(1, n)]
    try:
        tp = init_group(0, n, device.type, init_method, JOIN_TIMEOUT)
    except BaseException as exc:
        for p in procs:
            p.kill()
            p.wait()
        codes = [p.returncode for p in procs]
        raise RuntimeError(f"the tensor-parallel workers did not join (exit codes {codes}): {exc}") from exc
    tp.workers = procs
    return tp


class TPWorker:
    """Ranks 1..N-1: this rank's shard of the model and a twin of rank 0's KV cache; executes rank 0's plans."""

    def __init__(self, config: EngineConfig, tp: TPGroup):
        from vattn.engine import resolve_dtype
        from vattn.kv_cache import create_kv_cache
        from vattn.loader import load_model
        from vattn.model_runner import ModelRunner

        self.tp = tp
        dtype = resolve_dtype(config.dtype, tp.device)
        self.model, _ = load_model(config.model, dtype, tp.device, tp)
        op, kv_args = tp.broadcast()  # rank 0's KV cache parameters, once its own cache is built
        if op != "init":
            raise RuntimeError(f"tensor-parallel worker {tp.rank}: expected 'init' from rank 0, got {op!r}")
        self.kv, error = None, None
        try:
            self.kv = create_kv_cache(**{**kv_args, "device": tp.device, "background_mapping": False})
        except Exception as exc:  # e.g. this GPU has less free memory than rank 0's
            error = f"rank {tp.rank}: {type(exc).__name__}: {exc}"
        tp.gather(error)
        if error is not None:
            raise RuntimeError(error)
        self.runner = ModelRunner(self.model, tp.device, self.kv)

    def run(self) -> None:
        """Execute plans until rank 0 says 'shutdown' (or goes away: the broadcast then raises)."""
        try:
            while True:
                op, payload = self.tp.broadcast()
                if op == "shutdown":
                    return
                ops, arg = payload
                self.kv.apply_ops(ops)
                if op == "step":
                    self.kv.check_step(arg.meta)
                    self.runner.execute(arg)
                elif op == "stats":
                    self.tp.gather(self.kv.stats())
                else:
                    raise RuntimeError(f"tensor-parallel worker {self.tp.rank}: unknown message {op!r}")
        finally:
            self.kv.close()


def run_worker(config: EngineConfig, tp: TPGroup) -> None:
    if tp.device.type == "cpu":
        torch.set_num_threads(config.num_threads or cpu_threads(tp.world_size))
    try:
        TPWorker(config, tp).run()
    finally:
        tp.close()


def cpu_threads(n: int) -> int:
    """Torch threads per rank on CPU when num_threads is not given: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // n)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process (thread) that started it exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vattn.tp_worker", description="a tensor-parallel worker "
                                     "(started by rank 0; not meant to be run by hand)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--device-type", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level="INFO", format=f"%(asctime)s %(levelname)s tp-rank-{args.rank}: %(message)s")
    config = EngineConfig(**json.loads(args.config))
    tp = init_group(args.rank, args.world_size, args.device_type, args.init_method, JOIN_TIMEOUT)
    try:
        run_worker(config, tp)
    except Exception:
        log.exception("tensor-parallel worker %d failed", args.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
