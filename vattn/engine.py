"""The engine: requests in, one step at a time, RequestOutputs out. The server and `LLM` both drive it."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from vattn.beam_search import BeamSearch
from vattn.config import EngineConfig
from vattn.detokenizer import IncrementalDetokenizer
from vattn.kv_cache import KVStats, create_kv_cache
from vattn.loader import load_model, load_tokenizer, read_config
from vattn.model_runner import ModelRunner
from vattn.models import ModelConfig
from vattn.models.parallel import check_divisible, local_kv_heads
from vattn.outputs import CompletionOutput, RequestMetrics, RequestOutput
from vattn.sampler import Sampler, SamplingRow, token_logprobs
from vattn.sampling_params import SamplingParams
from vattn.scheduler import SampledToken, Scheduler
from vattn.sequence import Request, Sequence
from vattn.stop import StopChecker

log = logging.getLogger("vattn.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return device


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    kv: KVStats
    cached_prompt_tokens: int = 0  # prompt tokens of ended requests that the prefix cache served


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tp = None  # tensor parallelism: this process is rank 0 of config.tensor_parallel_size ranks
        if config.tensor_parallel_size > 1:
            self._start_tensor_parallel(config)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.kv = None
        try:
            self.tokenizer = load_tokenizer(config.model)
            self.model, self.spec = load_model(config.model, self.dtype, self.device, self.tp)
            self.max_model_len = config.max_model_len or min(self.spec.max_position_embeddings, 4096)
            self.eos_token_ids = set(self.spec.eos_token_ids)
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids.add(self.tokenizer.eos_token_id)
            kv_spec = self.spec  # with N ranks each holds its share of the kv heads
            if self.tp is not None:
                kv_spec = dataclasses.replace(self.spec, num_kv_heads=local_kv_heads(self.spec.num_kv_heads,
                                                                                    self.tp.world_size))
            kv_args = dict(
                kind=config.kv_cache, spec=kv_spec, dtype=self.dtype, device=self.device,
                max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                memory_bytes=config.kv_cache_memory or self._default_kv_memory(), page_size=config.page_size,
                block_size=config.block_size, background_mapping=config.background_mapping,
                enable_prefix_caching=config.enable_prefix_caching, attention_kernel=config.attention_kernel,
                kv_layout=config.kv_layout)
            self.kv = create_kv_cache(**kv_args)
            if self.tp is not None:
                self._start_workers_kv(kv_args)
            self._fit_max_model_len(config)
            self._finish_init(config)
        except BaseException:  # a failed start must not keep the KV pool (85% of free GPU memory) or workers
            if self.kv is not None:
                self.kv.close()
            if self.tp is not None:
                self.tp.close()
            raise

    def _start_tensor_parallel(self, config: EngineConfig) -> None:
        """Check that the model splits over N ranks (before any process starts), then start or join them."""
        from vattn.tp_worker import check_world, cpu_threads, start_group

        check_world(config.tensor_parallel_size, self.device)
        check_divisible(ModelConfig.from_hf(read_config(config.model)), config.tensor_parallel_size)
        self.tp = start_group(config, self.device)
        self.device = self.tp.device
        if self.device.type == "cpu" and config.num_threads is None:
            torch.set_num_threads(cpu_threads(self.tp.world_size))

    def _start_workers_kv(self, kv_args: dict) -> None:
        """Rank 0's cache is built: the workers build its twins, and from now on its memory operations are
        recorded for them (vattn.tp_worker)."""
        self.kv.start_recording()
        try:
            self.tp.broadcast(("init", kv_args))
            errors = [e for e in self.tp.gather(None) if e is not None]
        except Exception as exc:
            raise self.tp.failure(exc) from exc
        if errors:
            raise RuntimeError(f"a tensor-parallel worker could not build its KV cache: {'; '.join(errors)}")

    def _fit_max_model_len(self, config: EngineConfig) -> None:
        """A server must not advertise a length its KV pool cannot hold: refuse, or lower the default and say so."""
        fits = self.kv.max_sequence_tokens
        if fits >= self.max_model_len:
            return
        msg = (f"the KV cache ({config.kv_cache}, {self.kv.stats().units_total} units) holds at most {fits} tokens "
               f"of one sequence, less than max_model_len={self.max_model_len}")
        if config.max_model_len is not None:
            raise ValueError(f"{msg}: raise kv_cache_memory or set max_model_len <= {fits}")
        if fits < 2:
            raise ValueError(f"{msg}: raise kv_cache_memory")
        log.warning("%s: max_model_len lowered to %d", msg, fits)
        self.max_model_len = self.kv.max_model_len = fits

    def _finish_init(self, config: EngineConfig) -> None:
        swapper = None
        mode = config.preemption_mode or ("swap" if self.device.type == "cuda" and self.tp is None else "recompute")
        if mode == "swap":
            from vattn.swap import Swapper
            swapper = Swapper(self.kv)
        self.preemption_mode = mode
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, swapper,
                                   eos_token_ids=frozenset(self.eos_token_ids), max_model_len=self.max_model_len)
        self.runner = ModelRunner(self.model, self.device, self.kv, self.tp)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        self._prompt_logprobs: dict[str, list] = {}  # request_id -> prompt logprobs so far

    def _default_kv_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.85) - (1 << 30)
        return 1 << 30  # 1 GiB of host pages: fits a 24 GiB machine with room to spare

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string (or give prompt_token_ids)")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids has ids outside the vocabulary [0, {self.spec.vocab_size}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens but max_model_len is {self.max_model_len}: "
                             "the prompt plus at least one generated token must fit")
        self.prompt_tokens_total += len(prompt_token_ids)
        req = Request(request_id, prompt, list(prompt_token_ids), params, [],
                      RequestMetrics(arrival_time=arrival_time or time.time()))
        seqs = req.seqs = [self._new_seq(req, prompt_token_ids, i)
                           for i in range(1 if params.use_beam_search else params.n)]
        req.pending_forks = seqs[1:]
        if params.use_beam_search:
            req.beam = BeamSearch(params.beam_width, params.length_penalty,
                                  params.max_tokens or self.max_model_len, frozenset(
                                      () if params.ignore_eos else self.eos_token_ids | set(params.stop_token_ids)))
        self.requests[request_id] = req
        self.scheduler.add(seqs[0])

    def add_requests(self, requests: list[dict]) -> list[Exception | None]:
        """add_request for each dict of its arguments; per request None, or the error that refused it (a ValueError
        for a bad prompt), so that one bad request does not keep the others out."""
        errors: list[Exception | None] = []
        for args in requests:
            try:
                self.add_request(**args)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _new_seq(self, req: Request, prompt_token_ids: list[int], index: int) -> Sequence:
        params = req.params
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed((params.seed + index) % 2**64)
        return Sequence(
            request_id=req.request_id, index=index, prompt_token_ids=list(prompt_token_ids), params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            stop_checker=StopChecker(params.stop or [], params.include_stop_str_in_output), generator=gen,
            logprobs=[] if params.logprobs is not None else None)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        if req.beam is not None:  # an aborted beam search answers with no hypotheses
            req.beam.done, req.beam.finished = True, []
        self._prompt_logprobs.pop(request_id, None)
        req.metrics.finished_time = time.time()
        self.cached_prompt_tokens_total += req.num_cached_tokens
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return self._fail_unschedulable()
        logits = self.runner.run(batch.seqs, batch.query_lens, self._note_scheduled(batch))
        tokens = self._sample(logits)
        self.scheduler.update(batch, tokens)
        moved = [t.seq.request_id for t in tokens] + self._advance_beams(logits)
        return self._outputs(dict.fromkeys(moved))

    def _note_scheduled(self, batch) -> set[int]:
        """Per-request metrics of a scheduled batch; returns the sequences whose prompt logits are wanted."""
        now, want_prompt = time.time(), set()
        for seq in batch.preempted:
            self.requests[seq.request_id].metrics.num_preemptions += 1
        for seq in batch.seqs:
            req = self.requests[seq.request_id]
            req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
            if (seq.index == 0 and req.params.prompt_logprobs is not None and req.prompt_logprobs is None
                    and seq.num_computed_tokens < len(req.prompt_token_ids)):
                want_prompt.add(seq.seq_id)
        return want_prompt

    def _sample(self, out) -> list[SampledToken]:
        """Next tokens for the sequences whose step reached their end (beams only stash their logprobs)."""
        for seq in out.prompt_seqs:
            self._collect_prompt_logprobs(seq, out.prompt_logits[seq.seq_id])
        seqs, parents, logit_rows = [], [], []
        for j, seq in enumerate(out.sample_seqs):
            req = self.requests[seq.request_id]
            if req.beam is not None:  # beams choose together once all of them have their logprobs
                req.beam_logprobs[seq.seq_id] = torch.log_softmax(out.sample_logits[j], -1)
                continue
            forks, req.pending_forks = req.pending_forks, []  # n > 1: the other samples share this row and cache
            seqs += [seq] + forks
            parents += [None] + [seq] * len(forks)
            logit_rows += [j] * (1 + len(forks))
        if not seqs:
            return []
        rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator,
                            tuple(self.eos_token_ids)) for s in seqs]
        logits = out.sample_logits
        if logit_rows != list(range(logits.shape[0])):  # forks share a row, beams left out: pick rows
            logits = logits.index_select(0, torch.tensor(logit_rows, dtype=torch.long, device=logits.device))
        results = self.sampler(logits, rows)
        now = time.time()
        for seq in seqs:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_token_time = metrics.first_token_time or now
        self.generation_tokens_total += len(seqs)
        return [SampledToken(s, r.token_id, r.logprob, r.top_logprobs, parent)
                for s, r, parent in zip(seqs, results, parents)]

    def _advance_beams(self, out) -> list[str]:
        """Beam searches whose live beams all have their next-token logprobs take their step; returns their ids."""
        moved = []
        for seq in out.sample_seqs:
            req = self.requests.get(seq.request_id)
            if req is not None and req.beam is not None and req.request_id not in moved \
                    and len(req.beam_logprobs) == len(req.live_seqs):
                self._beam_step(req)
                moved.append(req.request_id)
        return moved

    def _beam_step(self, req: Request) -> None:
        """All live beams have their next-token logprobs: choose the next beams, forking and dropping."""
        beams = req.live_seqs
        logprobs = torch.stack([req.beam_logprobs.pop(b.seq_id) for b in beams])
        room = self.max_model_len - len(beams[0].prompt_token_ids)
        chosen = req.beam.select([b.output_token_ids for b in beams], [b.cumulative_logprob for b in beams],
                                 logprobs, max_new=room)
        children: dict[int, list] = {}
        for c in chosen:
            children.setdefault(c.beam, []).append(c)
        for i, beam in enumerate(beams):
            conts = children.get(i, [])
            for c in conts[1:]:  # extra continuations fork the beam: they share its pages
                child = self._new_seq(req, beam.prompt_token_ids, len(req.seqs))
                child.output_token_ids = list(beam.output_token_ids)
                self.scheduler.fork(beam, child)
                req.seqs.append(child)
                self._extend_beam(child, c)
            if conts:
                self._extend_beam(beam, conts[0])
            else:
                self.scheduler.finish(beam, "dropped")
        if req.beam.done:
            for beam in req.live_seqs:
                self.scheduler.finish(beam, "dropped")

    def _extend_beam(self, seq: Sequence, c) -> None:
        seq.output_token_ids.append(c.token_id)
        seq.cumulative_logprob = c.cumulative_logprob
        self.generation_tokens_total += 1

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """Nothing could run although work waits, and nothing running will change that: fail the head request."""
        seq = self.scheduler.stuck()
        if seq is None:
            return []
        log.error("request %s cannot fit in the KV cache (%d tokens); aborting it", seq.request_id, len(seq))
        return [out for out in [self.abort(seq.request_id)] if out is not None]

    def _collect_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Row j of a prompt chunk starting at c predicts prompt token c + j + 1."""
        req = self.requests[seq.request_id]
        prompt, start = req.prompt_token_ids, seq.num_computed_tokens
        if start == 0:  # (again, after a recompute preemption)
            self._prompt_logprobs[req.request_id] = [None]
        partial = self._prompt_logprobs[req.request_id]
        n = min(logits.shape[0], len(prompt) - 1 - start)
        partial += token_logprobs(logits[:n], prompt[start + 1:start + 1 + n], req.params.prompt_logprobs)
        if len(partial) == len(prompt):
            req.prompt_logprobs = self._prompt_logprobs.pop(req.request_id)

    def _outputs(self, request_ids) -> list[RequestOutput]:
        """Outputs of the requests that moved: all of them when streamed, only finished ones for final_only."""
        outputs = []
        for rid in request_ids:
            req = self.requests[rid]
            if req.finished:
                req.metrics.finished_time = time.time()
                self.cached_prompt_tokens_total += req.num_cached_tokens
                del self.requests[rid]
            elif req.params.output_kind == "final_only":
                continue
            outputs.append(self._output(req))
        return outputs

    def _output(self, req: Request) -> RequestOutput:
        if req.beam is not None:
            return self._beam_output(req)
        for s in req.seqs:
            s.sync_text()
        outs = [CompletionOutput(
            index=s.index, text=s.text[: s.streamable_len], token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics,
                             req.prompt_logprobs, req.num_cached_tokens)

    def _beam_output(self, req: Request) -> RequestOutput:
        """Beam search answers once, at the end: the best n hypotheses, best first."""
        best = req.beam.finished[: req.params.n] if req.beam.done else []
        outs = [CompletionOutput(index=i, token_ids=h.token_ids, cumulative_logprob=h.cumulative_logprob,
                                 text=self.tokenizer.decode(h.token_ids,
                                                            skip_special_tokens=req.params.skip_special_tokens),
                                 finish_reason=h.finish_reason) for i, h in enumerate(best)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics,
                             None, req.num_cached_tokens)

    # -- introspection ----------------------------------------------------------------------------
    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    def stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting,
                           self.scheduler.num_preemptions, self.prompt_tokens_total,
                           self.generation_tokens_total, self.kv.stats(), self.cached_prompt_tokens_total)

    def rank_kv_stats(self) -> list[KVStats]:
        """KV stats of every tensor-parallel rank, rank 0 first (one entry without tensor parallelism)."""
        if self.tp is None:
            return [self.kv.stats()]
        self.tp.check()
        try:
            self.tp.broadcast(("stats", (self.kv.drain_ops(), None)))
            return self.tp.gather(self.kv.stats())
        except Exception as exc:
            raise self.tp.failure(exc) from exc

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.kv.close()
        if self.tp is not None:
            self.tp.close()
