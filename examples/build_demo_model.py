"""Build the bundled demo model: a small Llama trained on this machine's Python standard library.

    python examples/build_demo_model.py out/demo

Everything is local and offline: the text is the CPython standard library source that
ships with the interpreter, split by file hash into training (also used for calibration)
and held-out files; a byte-level BPE tokenizer is trained on the training split; a 4-layer
Llama is trained for a few hundred steps on CPU (about three minutes on 2 cores). The result is a
regular Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json), which the
demo then allocates and evaluates like any user's model. Idempotent: an existing build is
kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

HELDOUT_SHARE = 10  # one file in 10 goes to the held-out split
MAX_CHARS = 3_000_000
SEQLEN = 256
BATCH = 16
STEPS = 400
VOCAB = 2048


def split_stdlib() -> tuple[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout, size = [], [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts or size > MAX_CHARS:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size += len(text)
        bucket = int(hashlib.sha256(str(f.relative_to(root)).encode()).hexdigest(), 16) % HELDOUT_SHARE
        (heldout if bucket == 0 else train).append(text)
    return "<|endoftext|>".join(train), "<|endoftext|>".join(heldout)


def train_tokenizer(text: str, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("<|endoftext|>"), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    model_dir, data_dir = args.out / "model", args.out / "data"
    if (model_dir / "model.safetensors").exists():
        print(f"demo model already built in {model_dir}")
        return
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    train_text, heldout_text = split_stdlib()
    (data_dir / "calib.txt").write_text(train_text[: len(train_text) // 4])
    (data_dir / "heldout.txt").write_text(heldout_text)
    train_tokenizer(train_text, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"])
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - SEQLEN - 1, (BATCH,), generator=gen)
        batch = torch.stack([ids[s:s + SEQLEN] for s in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    print(f"wrote {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) and {data_dir}")


if __name__ == "__main__":
    main()
