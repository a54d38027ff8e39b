"""Train vattn's bundled default model: a tiny Llama on CPython's own docs (pydoc_data.topics), on CPU.

Produces a standard Hugging Face Llama directory (config, safetensors, byte-level BPE tokenizer with a chat
template, generation config) plus training_metrics.json. Everything is deterministic given --seed.

    .venv/bin/python scripts/train_default_model.py              # defaults (900 steps): ~8-9 min on 2 quiet cores
    .venv/bin/python scripts/train_default_model.py --steps 20 --out /tmp/x   # smoke run

The module is importable: tests reuse load_corpus(), split_corpus(), document_text() and eval_windows().
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "vattn" / "default_model"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SAMPLE_PROMPTS = ['The "assert" statement', "The for statement", "A list comprehension"]
QUESTION_FORMS = ["Explain {} in Python.", "What is {}?", "Tell me about {}.", "How does {} work?"]

# Role-tagged turns, each closed by <|eos|>; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def load_corpus() -> dict[str, str]:
    """The pydoc topics shipped with CPython: {topic key: documentation text}."""
    from pydoc_data.topics import topics

    return {key: topics[key] for key in sorted(topics)}


def split_corpus(seed: int = 0, val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic split by topic key: (train_keys, val_keys); val gets >= val_fraction of the characters."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus = load_corpus()
    keys = sorted(corpus)
    random.Random(seed).shuffle(keys)
    total = sum(len(corpus[k]) for k in keys)
    val, chars = [], 0
    for key in keys:
        if chars >= val_fraction * total:
            break
        val.append(key)
        chars += len(corpus[key])
    train = [k for k in keys if k not in val]
    return sorted(train), sorted(val)


def document_text(text: str) -> str:
    """One plain training document: <|bos|> text <|eos|> (topics are separated by eos)."""
    return BOS + text.strip() + EOS


def chat_text(tokenizer, key: str, text: str, rng: random.Random, max_chars: int = 1500) -> str:
    """A chat-formatted document: a question about a topic, answered by the topic's opening paragraphs."""
    answer = ""
    for para in text.strip().split("\n\n"):
        if answer and len(answer) + len(para) > max_chars:
            break
        answer += ("\n\n" if answer else "") + para
    question = rng.choice(QUESTION_FORMS).format(key.replace("-", " "))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int = 1024):
    """Byte-level BPE over the training texts, wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate already-formatted documents (with their own bos/eos) into one token stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(stream: torch.Tensor, context: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, context] windows from the start of a stream (the fixed evaluation slices)."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    n = stream.numel() // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than context {context}")
    return stream[: n * context].view(n, context)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.size(0), batch_size):
        batch = windows[i : i + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio * args.lr
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True)


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save the tokenizer so that transformers 4.x and 5.x both load it, chat template inside tokenizer_config."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["additional_special_tokens"] = SPECIAL_TOKENS[3:]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": SPECIAL_TOKENS[3:]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of corpus characters held out, by topic")
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings in config.json")
    p.add_argument("--context", type=int, default=256, help="training window length (tokens)")
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--chat-docs", type=int, default=1, help="1: add a chat-formatted copy of each topic's opening")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=120)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored weight dtype")
    args = p.parse_args(argv)
    for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "context", "batch", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError(f"heads ({args.heads}) must divide hidden ({args.hidden}) and be a multiple of kv_heads")
    if args.context > args.max_positions:
        raise ValueError(f"context ({args.context}) must be <= max_positions ({args.max_positions})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic, and polite on a shared machine
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    corpus = load_corpus()
    train_keys, val_keys = split_corpus(args.seed, args.val_fraction)
    tokenizer = train_tokenizer([corpus[k] for k in train_keys], args.vocab, args.max_positions)
    rng = random.Random(args.seed)
    train_docs = [document_text(corpus[k]) for k in train_keys]
    if args.chat_docs:
        train_docs += [chat_text(tokenizer, k, corpus[k], rng) for k in train_keys]
    train_stream = encode_stream(tokenizer, train_docs)
    val_stream = encode_stream(tokenizer, [document_text(corpus[k]) for k in val_keys])
    print(f"topics: {len(train_keys)} train / {len(val_keys)} val {val_keys}; tokens: {train_stream.numel()} train "
          f"/ {val_stream.numel()} val; vocab {len(tokenizer)}", flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    val_windows = eval_windows(val_stream, args.context)
    train_eval_windows = eval_windows(train_stream, args.context, max_windows=val_windows.size(0))
    max_start = train_stream.numel() - args.context - 1
    history = []
    t_train = time.time()
    for step in range(args.steps):
        model.train()
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen)
        batch = torch.stack([train_stream[s : s + args.context] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            tok_s = (step + 1) * args.batch * args.context / elapsed
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} lr {lr_at(step, args):.2e} "
                  f"{tok_s:.0f} tok/s {elapsed:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            v = mean_loss(model, val_windows)
            history.append({"step": step + 1, "val_loss": v, "val_ppl": math.exp(v)})
            print(f"eval step {step + 1}: val loss {v:.3f} ppl {math.exp(v):.1f}", flush=True)
    train_seconds = time.time() - t_train

    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    model.to(dtype).save_pretrained(args.out, safe_serialization=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)

    # Final figures come from the saved artefact (weights as stored, run in float32), as the tests see it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    saved_tok = AutoTokenizer.from_pretrained(args.out)
    val_loss = mean_loss(saved, val_windows)
    train_loss = mean_loss(saved, train_eval_windows)
    samples = {p: greedy(saved, saved_tok, p) for p in SAMPLE_PROMPTS}
    chat_prompt = saved_tok.apply_chat_template(
        [{"role": "user", "content": "Explain assert in Python."}], tokenize=False, add_generation_prompt=True
    )
    ids = saved_tok(chat_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = saved.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=saved_tok.eos_token_id)
    samples["[chat] Explain assert in Python."] = saved_tok.decode(out[0, ids.size(1):], skip_special_tokens=True)
    metrics = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "train_topics": len(train_keys),
        "val_topics": val_keys,
        "train_tokens": train_stream.numel(),
        "val_tokens": val_stream.numel(),
        "tokens_seen": args.steps * args.batch * args.context,
        "train_loss": train_loss,
        "train_ppl": math.exp(train_loss),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "eval_windows": {"context": args.context, "val": val_windows.size(0), "train": train_eval_windows.size(0)},
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "threads": args.threads,
        "samples": samples,
    }
    (args.out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"final: train loss {train_loss:.3f} (ppl {math.exp(train_loss):.1f}), "
          f"val loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f}); {train_seconds:.0f}s training", flush=True)
    for prompt, text in samples.items():
        print(f"--- {prompt!r} ->\n{text}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
