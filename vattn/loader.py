"""Load a Hugging Face checkpoint directory (config.json + safetensors) into our model code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vattn.models import ModelConfig, build_model, packed_gemm

# HF name fragment -> (our fused module, shard index); shards are laid out in this order.
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints still carry


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a loaded model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    architecture: str
    dtype: torch.dtype
    bos_token_id: int | None = None
    sliding_window: int | None = None  # not applied by the model: keep max_model_len <= it

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


# Files from which transformers can build a tokenizer; a directory needs at least one of these groups.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("tokenizer.tiktoken",),
                   ("spiece.model",), ("vocab.txt",))


def load_tokenizer(model_dir: str | Path):
    """The Hugging Face tokenizer of `model_dir`; FileNotFoundError naming the files and the directory when it has
    none (transformers would otherwise fail later, with a message about sentencepiece or tiktoken)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES) and not any(
            path.glob("*.tiktoken")):
        expected = ", ".join(" + ".join(group) for group in TOKENIZER_FILES)
        raise FileNotFoundError(f"the tokenizer files are missing from model directory {path}: expected one of "
                                f"{expected} (with tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"could not load the tokenizer of model directory {path}: {exc}") from exc


def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"config.json not found in model directory {path}")
    return json.loads(file.read_text())


def weight_files(path: str | Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for f in files:
            if not (path / f).is_file():
                raise FileNotFoundError(f"weight shard {f} (listed in model.safetensors.index.json) not found in {path}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"model.safetensors (or model.safetensors.index.json) not found in {path}")
    return [single]


def eos_token_ids(path: Path, hf: dict) -> tuple[int, ...]:
    """Union of eos_token_id in config.json and generation_config.json (each an int or a list)."""
    ids: list[int] = []
    sources = [hf]
    gen = path / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        v = src.get("eos_token_id")
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its parameter (casting dtype/device); fail on gaps or extras."""
    cfg: ModelConfig = model.config
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    shard_sizes = {
        "qkv_proj": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim],
        "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size],
    }
    expected = set()
    for name in params:
        fused = next((m for m in shard_sizes if f".{m}." in name), None)
        expected |= {(name, i) for i in range(len(shard_sizes[fused]))} if fused else {(name, 0)}
    loaded = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if hf_name.endswith(SKIPPED_SUFFIXES):
                    continue
                if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                name, shard = hf_name, 0
                for frag, (ours, idx) in FUSED.items():
                    if f".{frag}." in hf_name:
                        name, shard = hf_name.replace(f".{frag}.", f".{ours}."), idx
                        break
                if name not in params:
                    raise ValueError(f"checkpoint weight {hf_name!r} in {file.name} has no place in {cfg.architecture}")
                owner, _, attr = name.rpartition(".")
                if hasattr(modules[owner], "load_shard"):  # tensor parallel: read only this rank's slice
                    try:
                        modules[owner].load_shard(attr, shard, f.get_slice(hf_name))
                    except ValueError as exc:
                        raise ValueError(f"checkpoint weight {hf_name!r}: {exc}") from None
                    loaded.add((name, shard))
                    continue
                param, tensor = params[name], f.get_tensor(hf_name)
                fused = next((m for m in shard_sizes if f".{m}." in name), None)
                target = param.data
                if fused is not None:
                    sizes = shard_sizes[fused]
                    target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
                if target.shape != tensor.shape:
                    raise ValueError(f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                target.copy_(tensor)
                loaded.add((name, shard))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(f'{n}[{i}]' for n, i in missing[:8])}")


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               tp=None) -> tuple[nn.Module, ModelSpec]:
    """Build the model for `path`'s config.json and fill it from its safetensors, on `device` in `dtype`; with a
    tensor-parallel group `tp` (vattn.distributed.TPGroup), this rank's shard, read slice by slice."""
    path = Path(path)
    hf = read_config(path)
    cfg = ModelConfig.from_hf(hf)
    files = weight_files(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = build_model(cfg, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    model.rotary.reset(device)
    load_weights(model, files)
    model.eval().requires_grad_(False)
    packed_gemm.pack_model(model)  # CPU float32: each linear layer's weight packed once for MKL's GEMM
    spec = ModelSpec(
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_ids=eos_token_ids(path, hf),
        architecture=cfg.architecture,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        sliding_window=cfg.sliding_window,
    )
    return model, spec
