"""Attention backends: kernels over the contiguous (virtual tensor) and paged KV layouts.

Submodules load lazily, so that `vattn.attention.kernels` (the kernel names config and cli read) costs no torch import.
"""

__all__ = ["AttentionMetadata", "ContiguousAttention", "PagedAttention"]


def __getattr__(name: str):
    if name == "AttentionMetadata":
        from vattn.attention.metadata import AttentionMetadata
        return AttentionMetadata
    if name == "ContiguousAttention":
        from vattn.attention.contiguous import ContiguousAttention
        return ContiguousAttention
    if name == "PagedAttention":
        from vattn.attention.paged import PagedAttention
        return PagedAttention
    raise AttributeError(f"module 'vattn.attention' has no attribute {name!r}")
