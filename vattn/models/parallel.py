"""Megatron-style tensor-parallel layers, and how a model's shapes split over N ranks.

  ColumnParallelLinear     output features split: each rank computes its columns (its heads; its MLP columns);
                           no communication. A fused layer (q|k|v, gate|up) lists one part per checkpoint tensor.
  RowParallelLinear        input features split: each rank multiplies its slice, an all-reduce sums the partial
                           results, then the bias is added (once: after the sum).
  VocabParallelEmbedding   vocabulary rows split: a rank looks up the ids in its range (zeros elsewhere), an
                           all-reduce sums the rows.
  ParallelLMHead           vocabulary rows split, the logits all-gathered; it can share the embedding's weight
                           (tied embeddings, Qwen2), since both hold the same rows on a rank.
The vocabulary is padded up to a multiple of N (zero rows, logits cut back to the vocabulary).

Each layer's `load_shard(attr, part, source)` copies its slice from a safetensors slice (`safe_open.get_slice`),
so a rank reads only its own rows or columns of the checkpoint. With N = 1 the model uses plain nn.Linear /
nn.Embedding instead, and none of this runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vattn.models import packed_gemm
from vattn.models.config import ModelConfig


def check_divisible(cfg: ModelConfig, n: int) -> None:
    """ValueError naming the numbers when `cfg` cannot be split over `n` ranks."""
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if cfg.num_heads % n:
        raise ValueError(f"tensor_parallel_size={n} does not divide the model's num_attention_heads={cfg.num_heads}")
    kv = cfg.num_kv_heads
    if kv % n and n % kv:
        raise ValueError(f"tensor_parallel_size={n} and the model's num_key_value_heads={kv}: one must divide the "
                         "other (kv heads are split when there are at least as many as ranks, else replicated)")
    if cfg.intermediate_size % n:
        raise ValueError(f"tensor_parallel_size={n} does not divide the model's intermediate_size="
                         f"{cfg.intermediate_size}")


def kv_head_range(num_kv_heads: int, n: int, rank: int) -> tuple[int, int]:
    """(first kv head, count) held by `rank`: split when num_kv_heads >= n, else one replicated head."""
    if num_kv_heads >= n:
        per = num_kv_heads // n
        return rank * per, per
    return rank * num_kv_heads // n, 1


def local_kv_heads(num_kv_heads: int, n: int) -> int:
    return kv_head_range(num_kv_heads, n, 0)[1]


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint slice has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _check_full(source, expected: tuple, what: str) -> None:
    shape = tuple(source.get_shape())
    if shape != expected:
        raise ValueError(f"checkpoint weight {what} has shape {shape}, expected {expected}")


class ColumnParallelLinear(nn.Module):
    """y = x @ W_local.T (+ b_local). `parts`: per checkpoint tensor (full_rows, first_row, rows) of this rank."""

    def __init__(self, in_features: int, parts: list[tuple[int, int, int]], bias: bool):
        super().__init__()
        self.in_features, self.parts = in_features, parts
        out = sum(rows for _, _, rows in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    packed: torch.Tensor | None = None  # set by packed_gemm.pack_model on CPU float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_gemm.linear(x, self.weight, self.bias, self.packed)

    def load_shard(self, attr: str, part: int, source) -> None:
        full, first, rows = self.parts[part]
        offset = sum(r for _, _, r in self.parts[:part])
        _check_full(source, (full, self.in_features) if attr == "weight" else (full,), f"{attr}[{part}]")
        _copy(getattr(self, attr).data.narrow(0, offset, rows), source[first:first + rows], f"{attr}[{part}]")


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W[:, local cols].T) + b: x holds this rank's slice of the input features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp):
        super().__init__()
        self.tp, self.in_features, self.out_features = tp, in_features, out_features
        self.local_in = in_features // tp.world_size
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(packed_gemm.linear(x, self.weight, None, self.packed))
        return y + self.bias if self.bias is not None else y

    def load_shard(self, attr: str, part: int, source) -> None:
        if attr == "bias":
            _check_full(source, (self.out_features,), attr)
            _copy(self.bias.data, source[:], attr)
            return
        _check_full(source, (self.out_features, self.in_features), attr)
        first = self.tp.rank * self.local_in
        _copy(self.weight.data, source[:, first:first + self.local_in], attr)


class _VocabShard(nn.Module):
    """A rank's rows [first, first + per_rank) of a [vocab, hidden] matrix, zero past the vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, tp):
        super().__init__()
        self.tp, self.vocab_size, self.hidden_size = tp, vocab_size, hidden_size
        self.per_rank = -(-vocab_size // tp.world_size)
        self.first = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))

    def load_shard(self, attr: str, part: int, source) -> None:
        _check_full(source, (self.vocab_size, self.hidden_size), attr)
        rows = max(0, min(self.per_rank, self.vocab_size - self.first))
        self.weight.data[rows:].zero_()
        _copy(self.weight.data[:rows], source[self.first:self.first + rows], attr)


class VocabParallelEmbedding(_VocabShard):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(_VocabShard):
    packed: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = packed_gemm.linear(hidden, self.weight, None, self.packed)
        return self.tp.all_gather_last(logits)[..., :self.vocab_size]


def qkv_parts(cfg: ModelConfig, tp) -> list[tuple[int, int, int]]:
    """(full rows, first row, rows) of q, k and v for this rank: its query heads and its kv heads."""
    d, n, r = cfg.head_dim, tp.world_size, tp.rank
    q_heads = cfg.num_heads // n
    kv_first, kv_count = kv_head_range(cfg.num_kv_heads, n, r)
    kv = (cfg.num_kv_heads * d, kv_first * d, kv_count * d)
    return [(cfg.num_heads * d, r * q_heads * d, q_heads * d), kv, kv]


def gate_up_parts(cfg: ModelConfig, tp) -> list[tuple[int, int, int]]:
    per = cfg.intermediate_size // tp.world_size
    part = (cfg.intermediate_size, tp.rank * per, per)
    return [part, part]
