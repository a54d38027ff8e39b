"""Tiny random-weight Hugging Face checkpoints (plus a real byte-level BPE tokenizer) for tests.

`make_tiny_model("qwen3", dir)` writes config.json, model.safetensors, generation_config.json and
tokenizer files that `transformers.AutoModelForCausalLM` / `AutoTokenizer` and `vattn.loader` all read.
`get_tiny_model(family, root)` caches one directory per (family, dtype, overrides) under `root`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BOS, EOS = "<|bos|>", "<|eos|>"
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # large on purpose: greedy tokens must vary, or equality tests prove nothing
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

_FAMILY = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v carry a bias in Qwen2
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32)),  # head_dim != 64 / 4
}

_tokenizers: dict[int, object] = {}


def _corpus(num_chars: int = 16_000) -> list[str]:
    from pydoc_data.topics import topics

    texts, total = [], 0
    for key in sorted(topics):
        texts.append(topics[key])
        total += len(topics[key])
        if total >= num_chars:
            break
    return texts


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (`tokenizers`) trained on pydoc text, wrapped as PreTrainedTokenizerFast; cached."""
    if vocab_size in _tokenizers:
        return _tokenizers[vocab_size]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer vocab_size {tok.get_vocab_size()} != requested {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE
    )
    _tokenizers[vocab_size] = fast
    return fast


def make_tiny_model(family: str, path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `family` checkpoint (HF layout, safetensors) plus tokenizer to `path`."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in _FAMILY:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    config_name, extra = _FAMILY[family]
    max_shard_size = overrides.pop("max_shard_size", "2GB")
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; perturb them so loading them matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    GenerationConfig(
        bos_token_id=kwargs["bos_token_id"], eos_token_id=kwargs["eos_token_id"], pad_token_id=kwargs["pad_token_id"]
    ).save_pretrained(path)
    make_tokenizer(kwargs["vocab_size"]).save_pretrained(path)
    # transformers 5 writes the template to chat_template.jinja; keep a copy where older readers look too
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.setdefault("chat_template", CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return path


def get_tiny_model(family: str, tmp_root, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Build once per (family, dtype, seed, overrides) under `tmp_root`; later calls reuse the directory."""
    tag = "-".join([family, str(dtype).removeprefix("torch."), f"s{seed}"] + [f"{k}={overrides[k]}" for k in sorted(overrides)])
    tag = "".join(c if c.isalnum() or c in "-_=." else "_" for c in tag)[:120]
    path = Path(tmp_root) / tag
    if not (path / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=tmp_root, prefix=".build-"))
        make_tiny_model(family, tmp, dtype=dtype, seed=seed, **overrides)
        try:
            tmp.rename(path)  # atomic: a concurrent builder of the same tag simply loses the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_session_root: Path | None = None


def tiny_model_dir(family: str, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Like get_tiny_model, under one temporary directory per process (removed at exit)."""
    global _session_root
    if _session_root is None:
        _session_root = Path(tempfile.mkdtemp(prefix="vattn-tiny-"))
        atexit.register(shutil.rmtree, _session_root, True)
    return get_tiny_model(family, _session_root, dtype=dtype, **overrides)


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
