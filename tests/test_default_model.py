"""The bundled default model: a standard HF Llama directory that loads offline and has learned its corpus."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "vattn" / "default_model"
SCRIPT = ROOT / "scripts" / "train_default_model.py"
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json", "training_metrics.json", "TRAINING.md"]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def metrics():
    return json.loads((MODEL_DIR / "training_metrics.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_files_present_and_within_size_budget():
    missing = [name for name in REQUIRED if not (MODEL_DIR / name).is_file()]
    assert not missing, f"missing from {MODEL_DIR}: {missing}"
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 8 * 2**20, f"default model directory is {total / 2**20:.2f} MiB, budget 8 MiB"


def test_config_is_a_small_gqa_llama(tokenizer):
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # exercises the engine's GQA path
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert cfg.max_position_embeddings >= 1024
    assert cfg.vocab_size == len(tokenizer)
    assert 2048 <= cfg.vocab_size <= 4096
    gen = GenerationConfig.from_pretrained(MODEL_DIR)
    assert cfg.bos_token_id == gen.bos_token_id == tokenizer.bos_token_id
    assert cfg.eos_token_id == gen.eos_token_id == tokenizer.eos_token_id
    # The weights file holds exactly one tensor per parameter, stored compactly.
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"BF16", "F32"}, dtypes


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    for tok in ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tokenizer.all_special_ids, (tok, ids)
    text = 'The "assert" statement\n    if __debug__:\n\tx = 1  # naïve ✓'
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless on any text


def test_chat_template_renders_and_rejects_unknown_roles(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is yield?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is yield?<|eos|>\n<|assistant|>\n"
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 2
    with pytest.raises(Exception, match="chat role must be"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"], "tokenizer_config.json must carry the chat template"


def test_split_is_deterministic_disjoint_and_validated(script, metrics):
    train, val = script.split_corpus(metrics["seed"])
    assert (train, val) == script.split_corpus(metrics["seed"])
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(script.load_corpus())
    assert val == metrics["val_topics"]
    assert script.split_corpus(metrics["seed"] + 1)[1] != val
    with pytest.raises(ValueError, match="val_fraction"):
        script.split_corpus(0, val_fraction=1.5)


def test_held_out_perplexity_far_below_uniform(script, metrics, tokenizer, model):
    corpus = script.load_corpus()
    _, val = script.split_corpus(metrics["seed"])
    stream = script.encode_stream(tokenizer, [script.document_text(corpus[k]) for k in val])
    windows = script.eval_windows(stream, metrics["eval_windows"]["context"])
    assert windows.size(0) == metrics["eval_windows"]["val"]
    loss = script.mean_loss(model, windows)
    assert math.exp(loss) < len(tokenizer) / 20, f"held-out perplexity {math.exp(loss):.1f}"
    assert loss == pytest.approx(metrics["val_loss"], abs=1e-3)  # the recorded figure is reproducible


def test_greedy_continuation_reads_like_python_docs(script, tokenizer, model):
    words = set(re.findall(r"[A-Za-z]+", " ".join(script.load_corpus().values())))
    ids = tokenizer('The "assert" statement', return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    text = tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
    tokens = text.split()
    assert len(tokens) >= 10, text
    real = [t for t in tokens if (w := t.strip(".,;:()[]\"'`")).isalpha() and w in words]
    assert len(real) / len(tokens) >= 0.6, f"only {len(real)}/{len(tokens)} real words in {text!r}"


def test_model_learned_to_end_documents_with_eos(script, metrics, tokenizer, model):
    corpus = script.load_corpus()
    train, _ = script.split_corpus(metrics["seed"])
    hits = 0
    for key in train[:8]:
        ids = tokenizer.encode(script.document_text(corpus[key]), add_special_tokens=False)[-129:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        hits += tokenizer.eos_token_id in logits.topk(5).indices.tolist()
    assert hits >= 6, f"eos in the top 5 at only {hits}/8 document ends"


def test_vattn_default_llm_agrees_with_transformers(tokenizer, model):
    """`LLM()` with no model argument serves this model, and its greedy text is transformers' token for token."""
    from vattn import LLM, SamplingParams

    prompts = ['The "assert" statement', "A for loop", "The import system"]
    with LLM(kv_cache_memory=64 << 20, device="cpu") as llm:
        assert Path(llm.engine.config.model) == MODEL_DIR
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        chat = llm.chat([{"role": "user", "content": "Explain assert in Python."}],
                        SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.size(1):].tolist()
        n = len(out.outputs[0].token_ids)  # ours stops at eos too; transformers pads after it
        assert out.outputs[0].token_ids == ref[:n]
        assert out.outputs[0].text == tokenizer.decode(ref[:n], skip_special_tokens=True)
    assert chat.outputs[0].text.strip()
