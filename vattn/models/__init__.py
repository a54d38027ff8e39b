"""Model code: one Llama-family decoder with per-architecture flags, and the architecture registry."""

from vattn.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from vattn.models.llama import CausalLM
from vattn.models.parallel import check_divisible


def build_model(cfg: ModelConfig, tp=None) -> CausalLM:
    """The module for `cfg.architecture` (every supported architecture shares CausalLM); with a tensor-parallel
    group `tp` of N > 1 ranks, this rank's shard of it."""
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
    if tp is not None and tp.world_size > 1:
        check_divisible(cfg, tp.world_size)
        return CausalLM(cfg, tp)
    return CausalLM(cfg)


__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "ModelConfig", "build_model"]
