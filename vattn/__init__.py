"""vattn: an LLM serving engine whose KV cache is virtually contiguous, with physical pages mapped on demand."""

from vattn.config import EngineConfig
from vattn.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used.
    if name == "LLM":
        from vattn.llm import LLM
        return LLM
    if name == "LLMEngine":
        from vattn.engine import LLMEngine
        return LLMEngine
    if name == "SamplingParams":
        from vattn.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'vattn' has no attribute {name!r}")
