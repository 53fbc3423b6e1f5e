"""Decoding speed on the GPU: bf16 against bitalloc's packed kernels, end to end and layer by layer.

    python benchmarks/decode.py e2e --model DIR --quantized OUT --json F.json
        greedy decoding of a real checkpoint (bf16, from_pretrained) and of its quantized directory
        (bitalloc.load_quantized), static KV cache, the forward compiled with CUDA graphs
    python benchmarks/decode.py synthetic --plan PLAN.json --json F.json
        the same for a stack of Llama-3-8B-shaped layers (random weights, built on the GPU) whose
        linears take the widths the plan gives its layers (layer i of the stack: plan layer i mod L)
    python benchmarks/decode.py mixing --plan PLAN.json --json F.json
        one decode step's linears (M = 1) at the plan's mixed widths, CUDA-graph replay, against the
        sum of each (shape, width) timed alone: what mixing widths costs

Needs a CUDA GPU, torch, triton and transformers. Tokens/s is the median of three timed
decoding calls after a warm-up call (compilation, autotuning, graph capture), each decoding exactly
``--tokens`` tokens: ``--loop generate`` calls transformers' ``generate`` (``min_new_tokens =
max_new_tokens``), ``--loop step`` a plain loop of compiled, graph-replayed forward steps with the
argmax on the device (no per-token host work beyond the launch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import random_codes, time_graph  # noqa: E402  (benchmarks/kernels.py)

from bitalloc.kernels.quant_linear import QuantLinear  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 8192, "max_position_embeddings": 4096}
GROUP = 128


def plan_widths(path: str) -> dict[tuple[int, str], int]:
    """(layer, projection) -> bits of a per-tensor plan's decoder-layer linears (16: kept unquantized)."""
    entries = json.loads(Path(path).read_text())["entries"]
    widths = {}
    for e in entries:
        proj = e["module"].rpartition(".")[2]
        if e.get("layer") is not None and proj in PROJECTIONS and e.get("expert") is None:
            widths[(e["layer"], proj)] = 16 if e.get("locked") else e["bits"]
    if not widths:
        sys.exit(f"error: {path} has no decoder-layer linears of a dense model")
    return widths


def random_quant_linear(lin: nn.Linear, bits: int, seed: int) -> QuantLinear:
    """A ``QuantLinear`` of ``lin``'s shape with random codes (timing only: the values do not matter)."""
    out, inp = lin.weight.shape
    return QuantLinear.from_codes(random_codes(out, inp, bits, GROUP, lin.weight.dtype, seed))


def tokens_per_second(model: nn.Module, prompt: torch.Tensor, tokens: int) -> dict[str, float]:
    """Greedy decoding with a static cache and a compiled, graph-replayed forward."""
    from transformers import CompileConfig

    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                  cache_implementation="static", compile_config=CompileConfig(fullgraph=True,
                                                                              mode="reduce-overhead"))
    return _timed(lambda: model.generate(prompt, **kwargs)[:, prompt.shape[1]:], tokens)


def loop_tokens_per_second(model: nn.Module, prompt: torch.Tensor, tokens: int) -> dict:
    return _timed(step_decoder(model, prompt, tokens), tokens)


def step_decoder(model: nn.Module, prompt: torch.Tensor, tokens: int, compile_: bool = True):
    """Greedy decoding without ``generate``: one static cache (reset per call, its addresses fixed so the
    graphs stay valid), the prompt run eagerly, then one compiled, graph-replayed forward per token with the
    argmax taken on the device. What a serving loop does; ``generate`` adds per-token host work on top."""
    from transformers import StaticCache

    n = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + tokens)
    pos = torch.arange(n + tokens, device=prompt.device)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compile_ else model.forward

    def decode() -> torch.Tensor:
        cache.reset()
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, cache_position=pos[:n], use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            out = [tok]
            for i in range(n, n + tokens - 1):
                logits = forward(input_ids=tok, past_key_values=cache, cache_position=pos[i:i + 1], use_cache=True).logits
                tok = logits[:, -1:].argmax(-1)  # a new tensor: the graph's output buffer is reused next step
                out.append(tok)
        return torch.cat(out, 1)

    return decode


def _timed(decode, tokens: int) -> dict:
    """Warm-up call, then the median of three timed calls."""
    t0 = time.perf_counter()
    first = decode()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = decode()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return {"tokens_per_s": tokens / statistics.median(runs), "warmup_s": warm,
            "runs_s": runs, "same_tokens_as_warmup": bool(torch.equal(first, out))}


SPEED = {"generate": tokens_per_second, "step": loop_tokens_per_second}


def e2e(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from bitalloc.rounding.loader import load_quantized_model  # the API package would import the solvers

    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).cuda()
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    rows = {"bf16": SPEED[args.loop](dense, prompt, args.tokens)}
    del dense
    quant = load_quantized_model(args.quantized, "cuda", torch.float16).eval()
    rows["bitalloc"] = SPEED[args.loop](quant, prompt, args.tokens)
    rows["speedup"] = rows["bitalloc"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"]
    return rows


def synthetic_model(widths: dict[tuple[int, str], int], layers: int) -> tuple[nn.Module, dict[str, int]]:
    """A bf16 Llama of ``layers`` Llama-3-8B-shaped layers (random weights), and the width of each linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    n_plan = 1 + max(layer for layer, _ in widths)
    chosen = {f"model.layers.{i}.{'mlp' if p.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{p}":
              widths.get((i % n_plan, p), 16) for i in range(layers) for p in PROJECTIONS}
    return model, chosen


def quantize_in_place(model: nn.Module, chosen: dict[str, int]) -> None:
    for k, (name, bits) in enumerate(chosen.items()):
        if bits >= 16:
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, random_quant_linear(getattr(owner, attr), bits, seed=k))


def synthetic(args: argparse.Namespace) -> dict:
    widths = plan_widths(args.plan)
    model, chosen = synthetic_model(widths, args.layers)
    prompt = torch.randint(0, LLAMA3_8B["vocab_size"], (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).cuda()
    rows = {"bf16": SPEED[args.loop](model, prompt, args.tokens)}
    quantize_in_place(model, chosen)
    rows["bitalloc"] = SPEED[args.loop](model, prompt, args.tokens)
    rows["speedup"] = rows["bitalloc"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"]
    rows["widths"] = chosen
    return rows


def mixing(args: argparse.Namespace) -> dict:
    """Graph time of one decode step's linears at mixed widths vs the sum of each timed on its own."""
    widths = plan_widths(args.plan)
    model, chosen = synthetic_model(widths, args.layers)
    calls = []
    for k, (name, bits) in enumerate(chosen.items()):
        lin = model.get_submodule(name)
        layer = lin if bits >= 16 else random_quant_linear(lin, bits, seed=k)
        x = torch.randn(1, lin.in_features, device="cuda", dtype=torch.bfloat16)
        calls.append((name, bits, lambda layer=layer, x=x: layer(x)))
    del model
    for _, _, f in calls:  # first calls: autotune and bind, outside any graph
        f()
    torch.cuda.synchronize()
    alone = [time_graph([f] * 8) for _, _, f in calls]  # one linear replayed 8 times: its steady time
    together = time_graph([f for _, _, f in calls]) * len(calls)
    return {"linears": len(calls), "step_us": together, "sum_alone_us": sum(alone),
            "ratio": together / sum(alone), "per_linear": [
                {"name": n, "bits": b, "alone_us": t} for (n, b, _), t in zip(calls, alone)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("e2e", "synthetic", "mixing"))
    p.add_argument("--model", help="e2e: the unquantized checkpoint")
    p.add_argument("--quantized", help="e2e: its bitalloc-quantized directory")
    p.add_argument("--plan", help="synthetic, mixing: a per-tensor plan giving each layer's widths")
    p.add_argument("--layers", type=int, default=8, help="synthetic, mixing: layers in the stack")
    p.add_argument("--tokens", type=int, default=256, help="tokens decoded per call")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--loop", choices=sorted(SPEED), default="generate",
                   help="e2e, synthetic: transformers' generate, or a plain loop of graph-replayed steps")
    p.add_argument("--json", required=True, metavar="OUT")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/decode.py needs a CUDA GPU")
    needed = {"e2e": ("model", "quantized"), "synthetic": ("plan",), "mixing": ("plan",)}[args.what]
    missing = [f"--{n}" for n in needed if getattr(args, n) is None]
    if missing:
        sys.exit(f"error: {args.what} needs {' and '.join(missing)}")
    result = {"what": args.what, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    result.update({"e2e": e2e, "synthetic": synthetic, "mixing": mixing}[args.what](args))
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("widths", "per_linear")}, indent=1))


if __name__ == "__main__":
    main()
