"""One decoder for the Llama family: Llama, Mistral, Qwen2 (q/k/v bias, tied embeddings), Qwen3 (q/k norm).

The batch is flattened and ragged: T tokens from B sequences, prefill chunks and decode tokens mixed.
Attention goes through `model.attn_backend.forward(layer_idx, q, k, v, meta)`, which owns the KV cache.
Module names follow the HF checkpoints except for two fusions: q/k/v -> qkv_proj, gate/up -> gate_up_proj.

Tensor parallelism: given a `tp` group (vattn.distributed.TPGroup) of N > 1 ranks, each rank builds its shard
(vattn.models.parallel: its heads and MLP columns, row-parallel o_proj/down_proj with an all-reduce, vocabulary-
parallel embedding and LM head). With tp=None the layers are nn.Embedding and
packed_gemm.Linear (nn.Linear that multiplies by a packed copy of its weight on CPU float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vattn.models import cpu_layers, packed_gemm
from vattn.models.config import ModelConfig
from vattn.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    gate_up_parts,
    local_kv_heads,
    qkv_parts,
)
from vattn.models.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused and x.dim() == 2:
            return cpu_layers.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp=None):
        super().__init__()
        self.layer_idx = layer_idx
        n = tp.world_size if tp is not None else 1
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads // n, local_kv_heads(cfg.num_kv_heads, n), cfg.head_dim
        q_size, kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        if tp is None:
            self.qkv_proj = packed_gemm.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
            self.o_proj = packed_gemm.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        else:
            self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, qkv_parts(cfg, tp), bias=cfg.qkv_bias)
            self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, meta, backend, fused: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: only these rows of the output are wanted (every token's K/V is still written and attended over)."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused:  # in place, on the qkv output's views
            cpu_layers.rope_(q, cos, sin), cpu_layers.rope_(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.forward(self.layer_idx, q, k, v, meta).reshape(T, -1)
        return self.o_proj(out if keep is None else out.index_select(0, keep))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        if tp is None:
            self.gate_up_proj = packed_gemm.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
            self.down_proj = packed_gemm.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        else:
            self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, gate_up_parts(cfg, tp), bias=False)
            self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if fused:
            return self.down_proj(cpu_layers.silu_mul(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, cos, sin, meta, backend, fused: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x + attn(norm(x)), then + mlp(norm(.)). fused (CPU): our one-pass ops, the residual updated in place.
        keep: return only these rows (after the attention, which needs every row's K/V)."""
        h = self.self_attn(self.input_layernorm(x, fused), cos, sin, meta, backend, fused, keep)
        if keep is not None:
            x = x.index_select(0, keep)
        if not fused:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        norm = self.post_attention_layernorm
        cpu_layers.add_rms_norm(h, x, norm.weight, norm.eps)  # x += h; h = norm(x)
        return x.add_(self.mlp(h, fused))


class Backbone(nn.Module):
    """The HF `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        if tp is None:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]; compute_logits -> float32 [N, vocab]."""

    def __init__(self, cfg: ModelConfig, tp=None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_scaling)
        if tp is None:
            self.lm_head = packed_gemm.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.tie_weights()
        self.attn_backend = None  # set by the model runner; one object serves every layer

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """keep_rows (int64 [N], optional): the rows whose final hidden state is wanted (the ones turned into logits);
        the last layer then runs its o_proj and MLP on those rows only, and the result is [N, hidden]. Every layer
        still writes every token's K/V. In a prefill chunk only the last token samples, so this skips most of the
        last layer's matrix products."""
        if self.attn_backend is None:
            raise ValueError("attn_backend is not set: assign model.attn_backend before forward")
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T], got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        fused = cpu_layers.use_for(x)
        if fused:
            cos, sin = cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1)  # [T, head_dim]
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta, self.attn_backend, fused, keep_rows if i == last else None)
        return self.model.norm(x, fused)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
