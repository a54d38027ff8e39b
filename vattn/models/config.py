"""ModelConfig: the architecture hyperparameters we need, parsed from a Hugging Face config.json dict."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per-architecture flags that config.json does not state (or states under different keys).
#   qkv_bias / o_bias: True, False, or the name of the config key that decides
#   qk_norm: per-head RMSNorm on q and k before rope (Qwen3)
ARCH_FLAGS: dict[str, dict] = {
    "LlamaForCausalLM": dict(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=False, o_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, o_bias=False, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCH_FLAGS)
ROPE_TYPES = ("default", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict = field(default_factory=dict)  # extra parameters of rope_type (llama3: factor, ...)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # recorded, not applied: cap max_model_len at it

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Parse a config.json dict; raise ValueError naming the field that we cannot honour."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCH_FLAGS), None)
        if arch is None:
            raise ValueError(
                f"unsupported architectures {archs!r} in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        flags = ARCH_FLAGS[arch]

        def flag(name: str) -> bool:
            v = flags[name]
            return bool(hf.get(v, False)) if isinstance(v, str) else v

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] < 1:
                raise ValueError(f"config.json field {key!r} must be a positive int, got {hf.get(key)!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json field 'hidden_act' must be 'silu', got {hf['hidden_act']!r}")
        if hf.get("mlp_bias", False):
            raise ValueError("config.json field 'mlp_bias' = true is not supported")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        theta, rope_type, scaling = parse_rope(hf)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=scaling,
            qkv_bias=flag("qkv_bias"),
            o_bias=flag("o_bias"),
            qk_norm=flags["qk_norm"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
        )


def parse_rope(hf: dict) -> tuple[float, str, dict]:
    """(theta, rope_type, scaling params) from either rope style.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}`; older files have top-level
    `rope_theta` and an optional `rope_scaling: {rope_type|type, factor, ...}`.
    """
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(params, dict) or ("rope_theta" not in params and any(isinstance(v, dict) for v in params.values())):
        raise ValueError(f"config.json field 'rope_parameters' per layer type is not supported: {params!r}")
    params = dict(params)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json field 'partial_rotary_factor' != 1 is not supported")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ValueError(f"config.json rope_type 'llama3' needs field {key!r}")
    return theta, rope_type, params
