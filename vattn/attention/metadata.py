"""AttentionMetadata: where each token of a flattened ragged batch sits, for the attention backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One step's batch: B sequences, T = sum(query_lens) tokens, concatenated in sequence order.

    Sequence i contributes query_lens[i] tokens (a prompt, a prompt chunk, or one decode token); after the
    step its cache holds context_lens[i] tokens, and this step's tokens sit at positions
    [context_lens[i] - query_lens[i], context_lens[i]).
    """

    query_lens: list[int]
    context_lens: list[int]
    cu_query_lens: torch.Tensor  # int32 [B+1]
    context_lens_tensor: torch.Tensor  # int32 [B]
    slots: list[int] | None = None  # contiguous path: row of the virtual KV tensor of each sequence
    slots_tensor: torch.Tensor | None = None  # int32 [B]
    token_slots: torch.Tensor | None = None  # int64 [T]: slot of each token (K/V writes)
    token_positions: torch.Tensor | None = None  # int64 [T]: position of each token
    block_tables: torch.Tensor | None = None  # paged path: int32 [B, max_blocks]
    slot_mapping: torch.Tensor | None = None  # paged path: int64 [T], flat cache index of each token
    max_query_len: int = 0
    max_context_len: int = 0
    cu_context_lens: torch.Tensor | None = None  # int32 [B+1]: cumulative context_lens (varlen kernels)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build_contiguous(
        cls, query_lens: list[int], context_lens: list[int], slots: list[int], device: torch.device | str = "cpu"
    ) -> AttentionMetadata:
        """Metadata for the virtually contiguous cache: sequence i lives in row slots[i]."""
        query_lens, context_lens = _check_lens(query_lens, context_lens)
        slots = [int(s) for s in slots]
        if len(slots) != len(query_lens):
            raise ValueError(f"slots has {len(slots)} entries, query_lens has {len(query_lens)}")
        if any(s < 0 for s in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct and >= 0, got {slots}")
        token_slots = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), torch.tensor(query_lens))
        meta = _common(query_lens, context_lens, device)
        meta.slots = slots
        meta.slots_tensor = torch.tensor(slots, dtype=torch.int32).to(device)
        meta.token_slots = token_slots.to(device)
        return meta

    @classmethod
    def build_paged(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for a block-table cache; tables are right-padded with 0 to the longest one."""
        query_lens, context_lens = _check_lens(query_lens, context_lens)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if len(block_tables) != len(query_lens):
            raise ValueError(f"block_tables has {len(block_tables)} rows, query_lens has {len(query_lens)}")
        mapping = []
        for i, (q, c) in enumerate(zip(query_lens, context_lens)):
            table = block_tables[i]
            if len(table) * block_size < c:
                raise ValueError(f"block_tables[{i}] has {len(table)} blocks, too few for context_len {c}")
            mapping += [table[p // block_size] * block_size + p % block_size for p in range(c - q, c)]
        width = max(len(t) for t in block_tables)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        meta = _common(query_lens, context_lens, device)
        meta.block_tables = torch.tensor(padded, dtype=torch.int32).to(device)
        meta.slot_mapping = torch.tensor(mapping, dtype=torch.int64).to(device)
        return meta


@dataclass
class MetadataArgs:
    """What AttentionMetadata is built from: plain lists, so a step's layout pickles small (tensor parallelism
    sends it from rank 0 to the workers, which build the same metadata on their own device)."""

    query_lens: list[int]
    context_lens: list[int]
    slots: list[int] | None = None  # contiguous path
    block_tables: list[list[int]] | None = None  # paged path
    block_size: int = 0

    def build(self, device: torch.device | str = "cpu") -> AttentionMetadata:
        if self.block_tables is not None:
            return AttentionMetadata.build_paged(self.query_lens, self.context_lens, self.block_tables,
                                                 self.block_size, device)
        return AttentionMetadata.build_contiguous(self.query_lens, self.context_lens, self.slots, device)


def _check_lens(query_lens, context_lens) -> tuple[list[int], list[int]]:
    query_lens, context_lens = [int(q) for q in query_lens], [int(c) for c in context_lens]
    if not query_lens:
        raise ValueError("query_lens is empty: a step needs at least one sequence")
    if len(query_lens) != len(context_lens):
        raise ValueError(f"query_lens has {len(query_lens)} entries, context_lens has {len(context_lens)}")
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        if q < 1:
            raise ValueError(f"query_lens[{i}] must be >= 1, got {q}")
        if c < q:
            raise ValueError(f"context_lens[{i}] = {c} is smaller than query_lens[{i}] = {q}")
    return query_lens, context_lens


def _common(query_lens: list[int], context_lens: list[int], device) -> AttentionMetadata:
    q = torch.tensor(query_lens, dtype=torch.int32)
    c = torch.tensor(context_lens, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)
    cu_q = torch.cat([zero, q.cumsum(0, dtype=torch.int32)])
    cu_c = torch.cat([zero, c.cumsum(0, dtype=torch.int32)])
    # position of token j of sequence i: context_len - query_len + j
    starts = torch.repeat_interleave((c - q).long(), q.long())
    offsets = torch.arange(int(q.sum())) - torch.repeat_interleave(cu_q[:-1].long(), q.long())
    return AttentionMetadata(
        query_lens=query_lens,
        context_lens=context_lens,
        cu_query_lens=cu_q.to(device),
        context_lens_tensor=c.to(device),
        token_positions=(starts + offsets).to(device),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        cu_context_lens=cu_c.to(device),
    )
