"""Model code: one Llama-family decoder with per-architecture flags, and the architecture registry."""

from vattn.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from vattn.models.llama import CausalLM


def build_model(cfg: ModelConfig) -> CausalLM:
    """The module for `cfg.architecture` (every supported architecture shares CausalLM)."""
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
    return CausalLM(cfg)


__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "ModelConfig", "build_model"]
