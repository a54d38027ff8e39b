"""The models a benchmark runs: any local Hugging Face directory, or a random-weight Llama preset built locally.

A preset is written once (config.json, model.safetensors, generation_config.json) under $VATTN_BENCH_MODELS (default
~/.cache/vattn/bench-models), with the bundled default model's tokenizer (a real byte-level BPE of 3,072 tokens), so
every engine -- vattn, transformers, vLLM -- loads the same directory and the server benchmarks can send text.
Nothing is downloaded. Contract: `resolve_model(name)` returns (directory, label) or raises ValueError.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vattn.config import DEFAULT_MODEL_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Random-weight Llama shapes. initializer_range 0.2 on the small ones: greedy tokens then vary (with 0.02 the logits
# are near-uniform and every step is a near-tie, which makes token-equality checks meaningless).
PRESETS: dict[str, dict] = {
    # the two models of the harness issue's table
    "llama-4l-h128": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=4096),
    "llama-8l-h512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, max_position_embeddings=4096),
    # test-sized, and the default of the older scripts
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=1024),  # head_dim 32: vLLM's CPU kernels need >= 32
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096),
    # Llama-3-8B shapes (hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336) with 4 layers: GPU runs
    "llama3-8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=8192, initializer_range=0.02),
}


def models_root() -> Path:
    return Path(os.environ.get("VATTN_BENCH_MODELS", Path.home() / ".cache" / "vattn" / "bench-models"))


def _tokenizer_ids() -> dict:
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    return {k: cfg[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}


def build_preset(preset: str, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write the random `preset` Llama (HF layout, safetensors) plus the default model's tokenizer to `path`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = _tokenizer_ids()
    kwargs = {"initializer_range": 0.2, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **ids,
              **PRESETS[preset]}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(**{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (DEFAULT_MODEL_DIR / name).exists():
            shutil.copy(DEFAULT_MODEL_DIR / name, path / name)
    return path


def preset_dir(preset: str, dtype: torch.dtype = torch.float32) -> Path:
    """Directory of the random `preset` model, built on first use (atomically: concurrent builders are safe)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)} or give a directory")
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{preset}-{str(dtype).removeprefix('torch.')}"
    if not (path / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        build_preset(preset, tmp, dtype)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(model: str, device: str = "cpu") -> tuple[str, str]:
    """(directory, label) for `model`: an existing directory, 'default' (the bundled model) or a preset name."""
    if model == "default":
        return str(DEFAULT_MODEL_DIR), "bundled default model"
    if os.path.isdir(model):
        return str(Path(model).resolve()), os.path.basename(os.path.normpath(model))
    if model in PRESETS:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        p = PRESETS[model]
        label = (f"random llama preset {model!r} ({p['num_hidden_layers']} layers, hidden {p['hidden_size']}, "
                 f"{p['num_attention_heads']} heads, {p['num_key_value_heads']} KV heads)")
        return str(preset_dir(model, dtype)), label
    raise ValueError(f"--model: {model!r} is neither a directory nor a preset ({', '.join(sorted(PRESETS))})")


def read_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def weight_bytes(model_dir: str) -> int:
    """Bytes of weights one decode step reads, from the safetensors headers: every tensor but an untied input
    embedding (a step looks up only its batch's rows of that one)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    names = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names |= set(sf.keys())
    untied = any(n.endswith("lm_head.weight") for n in names)
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if untied and name.endswith("embed_tokens.weight"):
                    continue
                sl = sf.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES[sl.get_dtype()]
    if total == 0:
        raise ValueError(f"no safetensors weights found in {model_dir}")
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
