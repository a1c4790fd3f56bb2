"""Train the small Qwen3 that ships inside bitswitch (python/bitswitch/data/qwen3-tiny).

Everything it needs comes with CPython and the test dependencies, so the run works offline:

- corpus: the reference-manual topics in `pydoc_data.topics` (the text `help("with")` shows)
  and the module, class and function docstrings of the standard library's own .py files,
  read with `ast` (nothing is imported or executed). Every 50th document is held out for
  validation.
- tokenizer: byte-level BPE trained with `tokenizers`, split with the Qwen2/Qwen3 pre-tokenizer
  pattern, the Qwen special tokens appended after the learned vocabulary.
- model: transformers' Qwen3ForCausalLM in float32 on CPU, AdamW, linear warmup then cosine
  decay. The run length is a time budget (--minutes) or an exact --steps; the model card records
  the steps run so that a run can be repeated.

    PYTHONPATH=python .venv/bin/python tools/train_tiny_qwen3.py --minutes 20 --threads 2

Output (bf16 weights, a few MB): config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json, README.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK, END_THINK]
# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newlines, and whitespace.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "python" / "bitswitch" / "data" / "qwen3-tiny"
# Sampling defaults written to generation_config.json: measured by eye on this model's
# samples; lower temperatures loop on phrases, higher ones drift into invented identifiers.
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}


# -- corpus ------------------------------------------------------------------------------------

def pydoc_topics() -> list:
    """The language reference topics bundled for `help()`; absent on a few trimmed installs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k].strip() for k in sorted(topics)]


def stdlib_docstrings(min_chars: int = 120) -> list:
    """Module, class and function docstrings of the standard library's .py sources (parsed,
    never imported), longest-first within a file, duplicates dropped; tests and idlelib's
    help text are skipped as they are mostly code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    docs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few sources are deliberately invalid (bad-syntax fixtures)
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def build_corpus() -> tuple:
    """(train documents, validation documents): every 50th document is validation."""
    docs = pydoc_topics() + stdlib_docstrings()
    if not docs:
        raise RuntimeError("no corpus: neither pydoc_data.topics nor the standard library sources were found")
    val = docs[::50]
    train = [d for i, d in enumerate(docs) if i % 50]
    return train, val


# -- tokenizer ---------------------------------------------------------------------------------

def train_tokenizer(docs: list, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # after the learned ids, as in Qwen's vocabulary
    return tok


def tokenizer_config(tok, context: int) -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
            "added_tokens_decoder": added, "additional_special_tokens": [IM_START, IM_END, THINK, END_THINK],
            "bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None,
            "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
            "model_max_length": context}


def encode_stream(tok, docs: list) -> torch.Tensor:
    """Documents joined into one id stream, each followed by <|endoftext|>."""
    eot = tok.token_to_id(ENDOFTEXT)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# -- model and training ------------------------------------------------------------------------

def make_model(args, vocab: int, eos: list):
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, tie_word_embeddings=True, rope_theta=10000.0,
        max_position_embeddings=args.context, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=None, eos_token_id=eos, pad_token_id=eos[-1])
    model = transformers.Qwen3ForCausalLM(cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over the first steps, cosine decay to a tenth of the peak over the run's
    progress (0..1: of the steps, or of the time budget)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch(stream: torch.Tensor, size: int, context: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - context, (size,), generator=gen)
    return torch.stack([stream[s: s + context] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, context: int, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    n = min(max_windows, len(stream) // context)
    windows = stream[: n * context].view(n, context)
    losses = [model(input_ids=w, labels=w).loss.item() for w in windows.split(16)]
    model.train()
    return sum(losses) / len(losses)


def train(model, stream: torch.Tensor, args) -> tuple:
    """Returns (steps run, tokens seen, the last logged training loss)."""
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget = args.minutes * 60
    model.train()
    start, running, step = time.time(), None, 0
    while True:
        # a time budget sets the schedule by elapsed time, so a busy machine shortens the run
        # instead of cutting the decay short
        progress = step / args.steps if args.steps else (time.time() - start) / budget
        if progress >= 1:
            break
        lr = lr_at(step, progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(stream, args.batch, args.context, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        step += 1
        if step % args.log_every == 0:
            print(f"step {step} ({progress:.0%})  loss {running:.3f}  lr {lr:.2e}  {time.time() - start:.0f} s",
                  flush=True)
    return step, step * args.batch * args.context, running


# -- output ------------------------------------------------------------------------------------

def save(model, tok, args, out: Path, stats: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "bfloat16"
    model.config.save_pretrained(out)
    # tied embeddings: lm_head.weight is the embedding table and is not stored twice
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, args.context), indent=2) + "\n")
    eos = model.config.eos_token_id
    gen = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": model.config.pad_token_id, **SAMPLING}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "README.md").write_text(model_card(args, stats))


def model_card(args, s: dict) -> str:
    return f"""# qwen3-tiny: the model bundled with bitswitch

A {s['params'] / 1e6:.1f}M-parameter language model with the Qwen3 architecture (transformers'
`Qwen3ForCausalLM`), trained from scratch on English documentation text that ships with CPython.
It exists so that bitswitch can load, quantize and generate with a real trained checkpoint
offline: its text reads like Python documentation but is not meant to be correct or useful.

| | |
|---|---|
| layers | {args.layers} |
| hidden / intermediate | {args.hidden} / {args.intermediate} |
| heads (query / key-value) x head_dim | {args.heads} / {args.kv_heads} x {args.head_dim} |
| vocabulary | {s['vocab']} (byte-level BPE, Qwen special tokens {', '.join(f'`{t}`' for t in SPECIAL_TOKENS)} at the end) |
| context | {args.context} tokens, RoPE theta 10000 |
| embeddings | tied (lm_head = embed_tokens) |
| weights | bfloat16 safetensors, trained in float32 |

## Training

- Corpus: the reference-manual topics of `pydoc_data.topics` and the module, class and function
  docstrings (at least 120 characters, de-duplicated) of the standard library's .py files of
  Python {s['python']}: {s['docs']} documents, {s['chars'] / 1e6:.1f}M characters,
  {s['train_tokens'] / 1e6:.2f}M training tokens; every 50th document ({s['val_tokens'] / 1e3:.0f}k tokens) held out.
- Tokenizer: byte-level BPE trained on the same documents (Qwen2/Qwen3 pre-tokenizer split).
- Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak learning rate {args.lr},
  {args.warmup} warmup steps then cosine decay to a tenth, gradient clipping 1.0, batch
  {args.batch} x {args.context} tokens, seed {args.seed}.
- Run: {s['steps']} steps ({s['tokens'] / 1e6:.1f}M tokens seen) in {s['minutes']:.0f} minutes on
  {args.threads} CPU threads ({s['machine']}).
- Final training loss (smoothed) {s['train_loss']:.3f}; validation loss {s['val_loss']:.3f}
  (perplexity {math.exp(s['val_loss']):.1f}).

No chat template is included: bitswitch uses its bundled Qwen3-style template. The model was
never trained on chat turns, so it continues text rather than answering.

## Reproduce

```sh
PYTHONPATH=python .venv/bin/python tools/train_tiny_qwen3.py --steps {s['steps']} --threads {args.threads}
```

The corpus depends on the Python version's standard library, and CPU floating-point results
can differ between machines, so another run gives a similar model, not the same bytes.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    ap.add_argument("--steps", type=int, default=None, help="exact number of steps (overrides --minutes)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size, special tokens included")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=640)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=30, help="warmup steps")
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error(f"--minutes must be positive, got {args.minutes}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    for name in ("hidden", "intermediate"):
        if getattr(args, name) % 64:
            ap.error(f"--{name} must be a multiple of 64 (bitswitch quantization groups), got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_docs, val_docs = build_corpus()
    chars = sum(map(len, train_docs)) + sum(map(len, val_docs))
    print(f"corpus: {len(train_docs) + len(val_docs)} documents, {chars / 1e6:.2f}M characters "
          f"(Python {platform.python_version()})", flush=True)
    tok = train_tokenizer(train_docs, args.vocab)
    train_stream, val_stream = encode_stream(tok, train_docs), encode_stream(tok, val_docs)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_stream) / 1e6:.2f}M tokens, "
          f"validation {len(val_stream) / 1e3:.0f}k tokens", flush=True)

    vocab = -(-tok.get_vocab_size() // 64) * 64  # padded to whole groups, as Qwen pads its table
    model = make_model(args, vocab, [tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)])
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters ({params * 2 / 2**20:.1f} MiB in bf16)", flush=True)

    t0 = time.time()
    steps, tokens, train_loss = train(model, train_stream, args)
    minutes = (time.time() - t0) / 60
    val_loss = validation_loss(model, val_stream, args.context)
    print(f"final validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}) after {steps} steps, "
          f"{tokens / 1e6:.1f}M tokens, {minutes:.1f} min", flush=True)

    stats = {"params": params, "vocab": vocab, "python": platform.python_version(),
             "docs": len(train_docs) + len(val_docs),
             "chars": chars, "train_tokens": len(train_stream), "val_tokens": len(val_stream), "steps": steps,
             "tokens": tokens, "minutes": minutes, "machine": platform.machine() or sys.platform,
             "train_loss": train_loss, "val_loss": val_loss}
    save(model, tok, args, args.out, stats)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
