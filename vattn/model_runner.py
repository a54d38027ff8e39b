"""Turns a scheduled batch into one forward pass over a flattened ragged batch of tokens.

A step is prepared (StepInputs: token ids, positions, the attention layout, which rows to turn into logits) and
then executed. With tensor parallelism (N > 1 ranks) rank 0 also broadcasts the step's plan, StepInputs plus the
KV cache's memory operations since the last step, and every worker executes the same inputs on its shard
(vattn.tp_worker); the model's collectives keep the ranks in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.attention.metadata import MetadataArgs
from vattn.kv_cache.base import KVCacheManager
from vattn.sequence import Sequence


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [num sampling seqs, vocab] float32, in batch order of the sampling seqs
    sample_seqs: list[Sequence]
    prompt_seqs: list[Sequence]  # sequences whose prompt-chunk logits were asked for (prompt_logprobs)
    prompt_logits: dict[int, torch.Tensor]  # seq_id -> [q, vocab] logits of that prompt chunk


@dataclass
class StepInputs:
    """One forward pass, as plain lists (it pickles small: rank 0 sends it to tensor-parallel workers)."""

    input_ids: list[int]
    positions: list[int]
    meta: MetadataArgs
    sample_rows: list[int]  # rows of the batch whose logits are sampled from
    prompt_spans: list[tuple[int, int]]  # (first row, rows) of each prompt chunk whose logits are wanted


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, kv: KVCacheManager, tp=None):
        self.model = model
        self.device = device
        self.kv = kv
        self.tp = tp  # rank 0 of a tensor-parallel group: broadcast each step's plan; None: one device
        model.attn_backend = kv.attention_backend  # every layer attends through the cache's backend

    def run(self, seqs: list[Sequence], query_lens: list[int], want_prompt_logits: set[int] = frozenset()) -> StepLogits:
        inputs, sample_seqs, prompt_seqs = self.prepare(seqs, query_lens, want_prompt_logits)
        if self.tp is None:
            sample_logits, prompt_logits = self.execute(inputs)
        else:
            self.tp.check()
            try:
                self.tp.broadcast(("step", (self.kv.drain_ops(), inputs)))
                sample_logits, prompt_logits = self.execute(inputs)
            except Exception as exc:
                raise self.tp.failure(exc) from exc
        return StepLogits(sample_logits, sample_seqs, prompt_seqs,
                          {s.seq_id: logits for s, logits in zip(prompt_seqs, prompt_logits)})

    def prepare(self, seqs: list[Sequence], query_lens: list[int], want_prompt_logits: set[int]):
        """(StepInputs, the sequences that sample, the sequences whose prompt logits are wanted)."""
        ids, positions, sample_rows, sample_seqs, prompt_seqs, prompt_spans = [], [], [], [], [], []
        offset = 0
        for seq, q in zip(seqs, query_lens):
            start = seq.num_computed_tokens
            ids.extend(seq.tokens(start, start + q))
            positions.extend(range(start, start + q))
            if start + q == len(seq):  # the chunk reaches the end: this sequence samples its next token
                sample_rows.append(offset + q - 1)
                sample_seqs.append(seq)
            if seq.seq_id in want_prompt_logits:
                prompt_seqs.append(seq)
                prompt_spans.append((offset, q))
            offset += q
        meta = self.kv.metadata_args(seqs, query_lens)
        return StepInputs(ids, positions, meta, sample_rows, prompt_spans), sample_seqs, prompt_seqs

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward pass: float32 logits of the sampled rows [S, vocab], and of each wanted prompt chunk."""
        meta = inputs.meta.build(self.device)
        input_ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(inputs.positions, dtype=torch.long, device=self.device)
        # Only the rows that become logits need the last layer's o_proj and MLP: sampled rows, then prompt spans.
        keep, spans = list(inputs.sample_rows), []
        for o, q in inputs.prompt_spans:
            spans.append((len(keep), q))
            keep.extend(range(o, o + q))
        keep_rows = None if keep == list(range(len(inputs.input_ids))) else \
            torch.tensor(keep, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, meta, keep_rows)  # [len(keep), hidden]
        n = len(inputs.sample_rows)
        sample_logits = self.model.compute_logits(hidden[:n]) if n else hidden.new_empty(0)
        prompt_logits = [self.model.compute_logits(hidden[o:o + q]).float() for o, q in spans]
        return sample_logits.float(), prompt_logits
