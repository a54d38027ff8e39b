"""Turns a scheduled batch into one forward pass over a flattened ragged batch of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.kv_cache.base import KVCacheManager
from vattn.sequence import Sequence


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [num sampling seqs, vocab] float32, in batch order of the sampling seqs
    sample_seqs: list[Sequence]
    prompt_seqs: list[Sequence]  # sequences whose prompt-chunk logits were asked for (prompt_logprobs)
    prompt_logits: dict[int, torch.Tensor]  # seq_id -> [q, vocab] logits of that prompt chunk


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, kv: KVCacheManager):
        self.model = model
        self.device = device
        self.kv = kv
        model.attn_backend = kv.attention_backend  # every layer attends through the cache's backend

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], query_lens: list[int], want_prompt_logits: set[int] = frozenset()) -> StepLogits:
        ids, positions, sample_rows, sample_seqs, prompt_rows = [], [], [], [], {}
        offset = 0
        for seq, q in zip(seqs, query_lens):
            start = seq.num_computed_tokens
            ids.extend(seq.tokens(start, start + q))
            positions.extend(range(start, start + q))
            if start + q == len(seq):  # the chunk reaches the end: this sequence samples its next token
                sample_rows.append(offset + q - 1)
                sample_seqs.append(seq)
            if seq.seq_id in want_prompt_logits:
                prompt_rows[seq.seq_id] = (seq, offset, q)
            offset += q
        meta = self.kv.build_metadata(seqs, query_lens, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, meta)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        sample_logits = self.model.compute_logits(hidden[rows]) if sample_rows else hidden.new_empty(0)
        prompt_logits = {sid: self.model.compute_logits(hidden[o:o + q]).float() for sid, (_, o, q) in prompt_rows.items()}
        return StepLogits(sample_logits.float(), sample_seqs, [s for s, _, _ in prompt_rows.values()], prompt_logits)
