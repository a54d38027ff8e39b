"""Attention backends: kernels over the contiguous (virtual tensor) and paged KV layouts."""

from vattn.attention.contiguous import ContiguousAttention
from vattn.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "ContiguousAttention"]
