"""Fixtures: tiny random-weight checkpoints built from configs, with a real tokenizer.

Tests never need real weights except the ones marked ``shared`` (skipped when ../shared
is absent). The tiny models are saved exactly as users' checkpoints are: config.json,
safetensors (sharded or not), tokenizer.json.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

_ROOT = Path(__file__).resolve().parents[1]
# the reference data: $BITALLOC_SHARED, else shared/ inside the checkout, else beside it
SHARED = Path(os.environ.get("BITALLOC_SHARED") or next(
    (p for p in (_ROOT / "shared", _ROOT.parent / "shared") if p.is_dir()), _ROOT.parent / "shared"))
DENSE = SHARED / "models" / "llama-dense-16m"
MOE = SHARED / "models" / "qwen3moe-20m"
CALIB = SHARED / "data" / "python-calib.txt.xz"
HELDOUT = SHARED / "data" / "python-heldout.txt.xz"

WORDS = ("def class return import from self for in if else while try except with as lambda yield "
         "print len range list dict value key item data result name path file open read write").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 8):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)))
    return "\n".join(lines) + "\n"


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(4000, 1)], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


def tiny_config(arch: str) -> dict:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    dense = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}
    if arch in dense:
        return {**common, "model_type": arch, "architectures": [dense[arch]]}
    if arch == "qwen3_moe":
        return {**common, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
                "decoder_sparse_step": 1, "mlp_only_layers": []}
    raise ValueError(arch)


def build_tiny_model(directory: Path, arch: str = "llama", layout: str = "per_expert", shards: int = 1,
                     seed: int = 0, **overrides) -> Path:
    """A random-weight checkpoint of ``arch``; MoE experts saved per expert or fused in 3-D."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**tiny_config(arch), **overrides}
    (directory / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied
    if arch == "qwen3_moe" and layout == "per_expert":
        state = _split_experts(state, cfg)
    _write_shards(directory, state, shards)
    _save_tokenizer(directory)
    return directory


def _split_experts(state: dict, cfg: dict) -> dict:
    out = {}
    inter = cfg["moe_intermediate_size"]
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k.rsplit(".", 1)[0]
            for e in range(v.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{base}.{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            base = k.rsplit(".", 1)[0]
            for e in range(v.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def _write_shards(directory: Path, state: dict, shards: int) -> None:
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", shards=2)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "moe", "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_moe_fused(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "moe_fused", "qwen3_moe", layout="fused")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(make_text(6000, 2))
    return p


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "heldout.txt"
    p.write_text(make_text(6000, 3))
    return p


@pytest.fixture(scope="session")
def llama_scores(tiny_llama, calib_file):
    import bitalloc

    return bitalloc.compute_scores(tiny_llama, calib_file, bitalloc.CalibrationConfig(tokens=512, seqlen=128))


@pytest.fixture(scope="session")
def moe_scores(tiny_moe, calib_file):
    import bitalloc

    return bitalloc.compute_scores(tiny_moe, calib_file, bitalloc.CalibrationConfig(tokens=512, seqlen=128))


def revalidated(data: dict):
    """``data`` (a plan's dump, edited) as a plan, its budget recomputed from what it now stores."""
    from bitalloc.plan import Decomposition, Entry, Plan

    entries = [Entry.model_validate(e) for e in data["entries"]]
    dec = data.get("decomposition")
    dec = Decomposition.model_validate(dec) if dec else None
    counted = [e for e in entries if not e.locked]
    bits = sum(e.storage_bits for e in counted) + (dec.storage_bits if dec else 0)
    params = sum(e.numel for e in counted)
    budget = {**data["budget"], "target_bits": bits, "achieved_bpp": bits / params, "counted_params": params}
    return Plan.model_validate({**data, "budget": budget})


def with_factor_widths(plan, width: int):
    """The plan with every factor slab at ``width`` (basis kept when > 0)."""
    data = plan.model_dump()
    for b in data["decomposition"]["blocks"]:
        for s in b["slabs"]:
            s["widths"] = [width] * len(s["widths"])
            s["basis_kept"] = width > 0
    return revalidated(data)


def with_layers_per_tensor(plan, layers: set[int], bits: int, group_size: int):
    """The plan with the experts of ``layers`` stored per tensor at ``bits``/``group_size`` instead of decomposed
    (what the hybrid solve chooses where a decomposition does not pay)."""
    data = plan.model_dump()
    data["decomposition"]["blocks"] = [b for b in data["decomposition"]["blocks"] if b["layer"] not in layers]
    if not data["decomposition"]["blocks"]:
        data["decomposition"] = None
    for e in data["entries"]:
        if e["decomposed"] and e["layer"] in layers:
            e.update(decomposed=False, bits=bits, group_size=group_size, symmetric=False)
    return revalidated(data)


def expect_user_error(result, *needles: str, written: Path | None = None) -> str:
    """A refused CLI call: exit 2, exactly one ``error:`` line containing ``needles``, no traceback, and
    ``written`` (when given) not created. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    if written is not None:
        assert not written.exists()
    return lines[0]


def png_pixels(data: bytes):
    """The decoded RGB pixels of a PNG, [height, width, 3] floats in [0, 1] (checks the signature first)."""
    import io

    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3]


def ink(pixels, box=(0.2, 0.8)) -> float:
    """Share of non-white pixels in the central box (as fractions of height and width): 0 for a blank plot area."""
    h, w = pixels.shape[:2]
    lo, hi = box
    area = pixels[int(h * lo):int(h * hi), int(w * lo):int(w * hi)]
    return float((area.min(-1) < 0.95).mean())


def pytest_collection_modifyitems(config, items):
    if DENSE.is_dir():
        return
    skip = pytest.mark.skip(reason=f"reference checkpoints not found at {SHARED}")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


torch.set_num_threads(min(2, os.cpu_count() or 1))
