"""Speed and memory of the calibration pass on synthetic Llama-shaped checkpoints (issue: scale).

    python benchmarks/scale.py build OUT --shape 1b            # random bf16 weights, one shard per layer
    bitalloc scores OUT --calib OUT/calib.txt -o t.safetensors  # the CLI on it (torchrun too)
    python benchmarks/scale.py run OUT --tokens 32768 --device cuda --save table.safetensors
    python benchmarks/scale.py compare a.safetensors b.safetensors

``build`` writes a checkpoint of the named shape (``SHAPES``; ``--layers`` overrides the depth, so a
single 70B-shaped layer can be timed), generated layer by layer on the chosen device so that an
8B- or 70B-shaped model never has to fit in host memory. Weights are N(0, 0.02^2) with unit norms:
random, but every code path (H, GPTQ, backward, statistics) does its full work on them; a word-level
tokenizer and ``calib.txt`` of random words let the CLI run on it as on a real checkpoint. ``run``
times :func:`bitalloc.sensitivity.collect.measure_errors` on random token ids (no tokenizer
needed) with every score family and prints one JSON line: wall time, tokens/s, per-phase timings,
peak GPU memory, peak host RSS. ``compare`` prints the largest relative difference between two
saved tables, per score (what "same table within 1e-4" is checked with).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save_file

SHAPES = {  # Llama 3 family shapes; vocab kept small (the head is not what this measures)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=8192),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=8192),
}


def build(out: Path, shape: str, layers: int | None, device: str, seed: int) -> None:
    """Write config.json, one safetensors shard per layer and the index, never holding the whole model."""
    cfg = dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
               max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
               hidden_act="silu")
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    d, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    def ones() -> torch.Tensor:
        return torch.ones(d, dtype=torch.bfloat16)

    shard("outer.safetensors", {"model.embed_tokens.weight": rand(v, d), "lm_head.weight": rand(v, d),
                                "model.norm.weight": ones()})
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard(f"layer-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(inter, d), p + "mlp.up_proj.weight": rand(inter, d),
            p + "mlp.down_proj.weight": rand(d, inter),
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones()})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    _tokenizer_and_text(out, v, seed)
    print(json.dumps({"built": str(out), "shape": shape, "layers": cfg["num_hidden_layers"]}))


def _tokenizer_and_text(out: Path, vocab: int, seed: int, words: int = 400_000) -> None:
    """A word-level tokenizer over ``vocab`` made-up words and ``calib.txt`` of random words, so that the
    CLI (``bitalloc scores``, under torchrun too) runs on the synthetic checkpoint as on a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<unk>"] + [f"w{i}" for i in range(1, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "unk_token": "<unk>"}))
    rng = np.random.default_rng(seed)
    lines = (" ".join(names[j] for j in row) for row in rng.integers(1, vocab, (words // 16, 16)))
    (out / "calib.txt").write_text("\n".join(lines) + "\n")


def run(model: Path, tokens: int, seqlen: int, device: str, save: Path | None, seed: int,
        profile: Path | None = None) -> None:
    from bitalloc.model.checkpoint import Checkpoint
    from bitalloc.model.inventory import build_inventory
    from bitalloc.plan import DEFAULT_CANDIDATES
    from bitalloc.sensitivity.collect import measure_errors

    ckpt = Checkpoint(model)
    inv = build_inventory(ckpt)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (tokens // seqlen, seqlen), generator=torch.Generator().manual_seed(seed))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with _profiled(profile, cuda):
        table = measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), device=device, seed=seed)
    wall = time.perf_counter() - t0
    result = {"model": str(model), "layers": ckpt.num_layers, "tokens": int(ids.numel()), "device": device,
              "wall_s": round(wall, 2), "tokens_per_s": round(ids.numel() / wall, 1),
              "phases": {k: round(v, 2) for k, v in table.meta["timings"].items()},
              "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name(0)
    if save is not None:
        table.save(save)
    print(json.dumps(result))


@contextmanager
def _profiled(out: Path | None, cuda: bool) -> Iterator[None]:
    """Run under torch.profiler when ``out`` is given and write its operator tables there: where the pass's
    time goes, by device time and by host time (the profiler slows the pass; time it without)."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        yield
    avg = prof.key_averages()
    keys = (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total", "cpu_time_total"]
    out.write_text("\n\n".join(f"sorted by {k}\n" + avg.table(sort_by=k, row_limit=40, max_name_column_width=60)
                                for k in keys))


def compare(a: Path, b: Path) -> None:
    """Largest relative difference per score between two tables of the same model and candidates."""
    from bitalloc.sensitivity.table import ErrorTable, max_relative_difference

    print(json.dumps({"max_rel_diff": max_relative_difference(ErrorTable.load(a), ErrorTable.load(b))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    b.add_argument("--layers", type=int)
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("--tokens", type=int, default=32768)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--device", default="auto")
    r.add_argument("--save", type=Path)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--profile", type=Path, help="write torch.profiler operator tables to this file")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.shape, args.layers, args.device, args.seed)
    elif args.cmd == "run":
        run(args.model, args.tokens, args.seqlen, args.device, args.save, args.seed, args.profile)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
