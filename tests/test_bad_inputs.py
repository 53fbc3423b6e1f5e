"""Every bad input a careless or hostile user can give, refused the same way (issue 11).

Each case runs one CLI command on a tiny model and asserts the contract of the README: exit code 2,
exactly one ``error:`` line naming the problem, no traceback, every input unchanged (files and the
model directory hashed before and after) and no temporary file left in $TMPDIR. The cases are data
(``CASES``), grouped by what went wrong before the fix: a traceback on input, a wrong answer with
exit 0, an unbounded resource, or a security hole; every case also checks that no input was touched.
Property-based tests then feed mutated budget strings, candidate strings and plan JSON to the parsers,
which may only ever raise :class:`~bitalloc.errors.BitallocError`. Peak memory of the
decompression-bomb and huge-group cases is measured in a subprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from bitalloc.cli import app
from bitalloc.errors import BitallocError
from bitalloc.plan import Entry, Plan

runner = CliRunner()
LONG_NAME = "n" * 300  # one path component over NAME_MAX (255)
DEEP = 100_000  # JSON nesting that overflows Python's recursion limit


# ---- fixtures --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    """The shared inputs of every case: two tiny models, their plans and score files, texts."""

    llama: Path
    moe: Path
    calib: Path
    heldout: Path
    plan: Path
    moe_plan: Path
    scores: Path
    moe_scores: Path
    root: Path


@pytest.fixture(scope="module")
def env(tiny_llama, tiny_moe, calib_file, heldout_file, llama_scores, moe_scores, tmp_path_factory) -> Env:
    import bitalloc

    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {}
    for name, model, table in (("llama", tiny_llama, llama_scores), ("moe", tiny_moe, moe_scores)):
        table.save(root / f"{name}.safetensors")
        bitalloc.allocate(model, "3.0", scores=table).save(root / f"{name}.json")
        paths[name] = (root / f"{name}.json", root / f"{name}.safetensors")
    return Env(tiny_llama, tiny_moe, calib_file, heldout_file, paths["llama"][0], paths["moe"][0], paths["llama"][1],
               paths["moe"][1], root)


@pytest.fixture
def tmpdir_env(tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty $TMPDIR for one case (tempfile caches the directory, so it is reset too)."""
    d = tmp_path_factory.mktemp("TMPDIR")
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


# ---- helpers ---------------------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    """sha256 over a file's bytes and mode, or over every file (name, bytes, mode) below a directory."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
        h.update(str(f.stat().st_mode).encode())
    return h.hexdigest()


def copy_model(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_json(path: Path, change: Callable[[Any], Any]) -> Path:
    """Rewrite a JSON file with ``change(data)`` (the returned value, or the data changed in place)."""
    data = json.loads(path.read_text())
    out = change(data)
    path.write_text(json.dumps(data if out is None else out))
    return path


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def rebudget(d: dict) -> dict:
    """A hand-edited plan made self-consistent again (counted params, achieved bpp, a budget that holds)."""
    counted = [Entry.model_validate(e) for e in d["entries"] if not e["locked"]]
    params, bits = sum(e.numel for e in counted), sum(e.storage_bits for e in counted)
    d["budget"].update(counted_params=params, achieved_bpp=bits / params, target_bits=max(bits, d["budget"]["target_bits"]))
    return d


def first_quantized(d: dict) -> dict:
    return next(e for e in d["entries"] if not e["locked"])


def drop_entry(d: dict) -> dict:
    gone = next(e for e in d["entries"] if not e["locked"] and e["role"] == "attn_o")["tensor"]
    d["entries"] = [e for e in d["entries"] if e["tensor"] != gone]
    return rebudget(d)


def reshape_entry(d: dict) -> dict:
    e = next(e for e in d["entries"] if not e["locked"] and e["role"] == "attn_o")
    e["shape"], e["numel"] = [e["shape"][0] // 2, e["shape"][1] * 2], e["numel"]
    return rebudget(d)


def quantize_norm(d: dict) -> dict:
    e = next(e for e in d["entries"] if e["role"] == "norm" and e.get("layer") is not None)
    c = d["candidates"][0]
    e.update(locked=False, reason=None, bits=c["bits"], group_size=c["group_size"], symmetric=c["symmetric"])
    return rebudget(d)


def swap_role(d: dict) -> dict:
    e = next(e for e in d["entries"] if not e["locked"] and e["role"] == "attn_o")
    e["role"] = "mlp_down"
    return d


def huge_group(d: dict) -> dict:
    d["candidates"].append({"bits": 8, "group_size": 10**9, "symmetric": False})
    e = next(e for e in d["entries"] if not e["locked"] and e["role"] == "attn_o")
    e.update(bits=8, group_size=10**9, symmetric=False)
    return rebudget(d)


def rename_entry(d: dict) -> dict:
    e = next(e for e in d["entries"] if e["role"] == "norm")
    e["tensor"] = e["tensor"].replace("norm", "nrm")
    return d


def write_scores(src: Path, dst: Path, header: Callable[[dict], Any] | None = None,
                 arrays: Callable[[dict], Any] | None = None) -> Path:
    """A copy of a score file with its JSON header or its arrays tampered with."""
    from safetensors import safe_open
    from safetensors.numpy import load, save

    with safe_open(str(src), "np") as f:
        meta = json.loads(f.metadata()["bitalloc"])
    data = load(src.read_bytes())
    if header:
        meta = header(meta) or meta
    if arrays:
        arrays(data)
    dst.write_bytes(save(data, metadata={"bitalloc": meta if isinstance(meta, str) else json.dumps(meta)}))
    return dst


def retype_tensor(model: Path, dtype: str) -> Path:
    """Rewrite one linear weight of the (sharded) model in ``dtype``."""
    import torch
    from safetensors.torch import load_file, save_file

    for shard in sorted(model.glob("*.safetensors")):
        state = load_file(str(shard))
        name = next((n for n in state if n.endswith("o_proj.weight")), None)
        if name:
            state[name] = state[name].to(getattr(torch, dtype))
            save_file(state, str(shard))
            return model
    raise AssertionError("no o_proj weight")


def set_shard(model: Path, value: Any) -> Path:
    """Point the first index entry at ``value`` (a path outside the model, a number, ...)."""
    def change(d: dict) -> None:
        d["weight_map"][next(iter(d["weight_map"]))] = value(model) if callable(value) else value
    return edit_json(model / "model.safetensors.index.json", change) and model


def symlinked_shard(model: Path) -> Path:
    """The first shard replaced by a symlink to a copy outside the model directory."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / next(iter(index["weight_map"].values()))
    outside = model.parent / "elsewhere.safetensors"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    return model


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def config_of(model: Path, **fields: Any) -> Path:
    """The model with config.json fields set (``None`` values delete the field)."""
    def change(d: dict) -> None:
        for k, v in fields.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
    edit_json(model / "config.json", change)
    return model


# ---- the cases -------------------------------------------------------------------------------------------------

# A case: (category, id, build) where build(env, tmp) returns (args, text the error line must contain).
# Categories (issue 11): traceback, wrong-answer, unbounded, security. Every case asserts inputs unchanged.
Case = tuple[str, str, Callable[[Env, Path], tuple[list, str]]]


def alloc(model: Path, env: Env, tmp: Path, *extra: Any) -> list:
    """allocate from calibration text, with the options that keep a successful run short."""
    return ["allocate", model, "--budget", "3", "--calib", env.calib, "-o", tmp / "out.json",
            "--calib-tokens", 256, "--seqlen", 128, "-q", *extra]


def with_calib(args: list, text: Path) -> list:
    """``args`` of :func:`alloc` with another calibration text."""
    i = args.index("--calib") + 1
    return args[:i] + [text] + args[i + 1:]


def alloc_scores(env: Env, tmp: Path, *extra: Any) -> list:
    return ["allocate", env.llama, "--budget", "3", "--scores", env.scores, "-o", tmp / "out.json", "-q", *extra]


def evaluate(env: Env, tmp: Path, *extra: Any, text: Path | None = None) -> list:
    return ["eval", env.llama, "--text", text or env.heldout, "--tokens", 256, "--seqlen", 128, "-q", *extra]


def config_case(id_: str, needle: str, category: str = "traceback", model: str = "llama", **fields: Any) -> Case:
    return (category, f"config-{id_}",
            lambda env, tmp: (alloc(config_of(copy_model(getattr(env, model), tmp / "m"), **fields), env, tmp), needle))


def raw_config(id_: str, text: str, needle: str) -> Case:
    def build(env: Env, tmp: Path):
        m = copy_model(env.llama, tmp / "m")
        write(m / "config.json", text)
        return alloc(m, env, tmp), needle
    return ("traceback", f"config-{id_}", build)


def index_case(category: str, id_: str, needle: str, change: Callable[[Path], Path]) -> Case:
    return (category, f"index-{id_}", lambda env, tmp: (alloc(change(copy_model(env.llama, tmp / "m")), env, tmp), needle))


def weight_map(value: Any) -> Callable[[Path], Path]:
    def change(m: Path) -> Path:
        edit_json(m / "model.safetensors.index.json", lambda d: d.update(weight_map=value))
        return m
    return change


def text_case(category: str, id_: str, name: str, content: str | bytes | Callable[[], bytes], needle: str) -> Case:
    def build(env: Env, tmp: Path):
        data = content() if callable(content) else content
        return with_calib(alloc(env.llama, env, tmp), write(tmp / name, data)), needle
    return (category, f"text-{id_}", build)


def option_case(category: str, id_: str, needle: str, *extra: Any, scores: bool = False) -> Case:
    if scores:
        return (category, f"option-{id_}", lambda env, tmp: (alloc_scores(env, tmp, *extra), needle))
    return (category, f"option-{id_}", lambda env, tmp: (alloc(env.llama, env, tmp, *extra), needle))


def eval_case(category: str, id_: str, needle: str, *extra: Any) -> Case:
    return (category, f"eval-{id_}", lambda env, tmp: (evaluate(env, tmp, *extra), needle))


def budget_case(budget: str, needle: str, category: str = "traceback") -> Case:
    return (category, f"budget-{budget if len(budget) < 16 else budget[:6] + '...' + budget[-4:]}",
            lambda env, tmp: (["allocate", env.llama, "--budget", budget, "--scores", env.scores, "-o",
                               tmp / "out.json", "-q"], needle))


def frontier_case(category: str, id_: str, needle: str, *extra: Any) -> Case:
    return (category, f"frontier-{id_}",
            lambda env, tmp: (["frontier", env.llama, "--scores", env.scores, "-o", tmp / "sweep", "-q", *extra], needle))


def plan_case(category: str, id_: str, needle: str, change: Callable[[dict], Any], command: str = "eval") -> Case:
    def build(env: Env, tmp: Path):
        p = edit_json(Path(shutil.copy(env.plan, tmp / "plan.json")), change)
        if command == "eval":
            return evaluate(env, tmp, "--plan", p), needle
        if command == "quantize":
            return ["quantize", env.llama, "--plan", p, "--calib", env.calib, "-o", tmp / "q", "--method", "rtn",
                    "--calib-tokens", 256, "--seqlen", 128, "-q"], needle
        return [command, p], needle
    return (category, f"plan-{command}-{id_}", build)


def raw_plan(category: str, id_: str, text: str, needle: str) -> Case:
    return (category, f"plan-show-{id_}", lambda env, tmp: (["show", write(tmp / "plan.json", text)], needle))


def scores_case(category: str, id_: str, needle: str, header=None, arrays=None) -> Case:
    return (category, f"scores-{id_}",
            lambda env, tmp: (["allocate", env.llama, "--budget", "3", "--scores",
                               write_scores(env.scores, tmp / "s.safetensors", header, arrays), "-o", tmp / "out.json",
                               "-q"], needle))


def import_case(category: str, id_: str, config: Any, needle: str) -> Case:
    return (category, f"import-{id_}",
            lambda env, tmp: (["import", write(tmp / "cfg.json", json.dumps(config)), "--model", env.llama, "-o",
                               tmp / "out.json"], needle))


def first_score(d: dict, value: float) -> None:
    key = next(k for k in d if k.startswith("score."))
    d[key] = d[key].copy()
    d[key][0, 0] = value


def set_array(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d[name] = value(d[name])
    return change


def export_widths(bits: int) -> Callable[[Env, Path], tuple[list, str]]:
    """A plan whose quantized entries all use ``bits`` (a candidate of their own), exported to llama.cpp."""
    def build(env: Env, tmp: Path):
        def change(d: dict) -> dict:
            d["candidates"] = [{"bits": bits, "group_size": 128, "symmetric": False}]
            for e in d["entries"]:
                if not e["locked"]:
                    e.update(bits=bits, group_size=128, symmetric=False, segments=None)
            d["tie_groups"] = d["tie_groups"]
            d["budget"]["target_bits"] = 10**15
            return rebudget(d)
        p = edit_json(Path(shutil.copy(env.plan, tmp / "plan.json")), change)
        return ["export", p, "--to", "llamacpp", "-o", tmp / "types.txt"], f"no {bits}-bit type"
    return build


CASES: list[Case] = [
    # -- config.json: tracebacks, and configs that disagree with the weights (wrong answers) --
    raw_config("list", "[1, 2]", "not a JSON object"),
    raw_config("string", '"llama"', "not a JSON object"),
    raw_config("null", "null", "not a JSON object"),
    raw_config("number", "42", "not a JSON object"),
    raw_config("nested", deep_json(), "not valid JSON"),
    raw_config("binary", "\x00\xff", "not valid JSON"),
    config_case("no-hidden-size", "'hidden_size'", hidden_size=None),
    config_case("no-layers", "'num_hidden_layers'", num_hidden_layers=None),
    config_case("no-vocab", "'vocab_size'", vocab_size=None),
    config_case("no-heads", "'num_attention_heads'", num_attention_heads=None),
    config_case("no-intermediate", "'intermediate_size'", intermediate_size=None),
    config_case("hidden-string", "hidden_size is '64'", hidden_size="64"),
    config_case("hidden-float", "hidden_size is 64.0", hidden_size=64.0),
    config_case("hidden-negative", "hidden_size is -64", hidden_size=-64),
    config_case("hidden-list", "hidden_size is [64]", hidden_size=[64]),
    config_case("layers-zero", "num_hidden_layers is 0", num_hidden_layers=0),
    config_case("layers-bool", "num_hidden_layers is True", num_hidden_layers=True),
    config_case("layers-huge", "num_hidden_layers=1000000000", "wrong-answer", num_hidden_layers=10**9),
    config_case("kv-heads-string", "num_key_value_heads is '2'", num_key_value_heads="2"),
    config_case("head-dim-negative", "head_dim is -1", head_dim=-1),
    config_case("positions-string", "max_position_embeddings is 'x'", max_position_embeddings="x"),
    config_case("tie-string", "tie_word_embeddings is 'yes'", tie_word_embeddings="yes"),
    config_case("heads-not-dividing", "not a multiple of num_attention_heads", head_dim=None, num_attention_heads=7),
    config_case("hidden-vs-embedding", "hidden_size=128", "wrong-answer", hidden_size=128),
    config_case("fewer-layers", "num_hidden_layers=1, but the weights hold layers 0..1", "wrong-answer",
                num_hidden_layers=1),
    config_case("more-layers", "num_hidden_layers=3", "wrong-answer", num_hidden_layers=3),
    config_case("vocab-vs-embedding", "vocab_size=321", "wrong-answer", vocab_size=321),
    config_case("vocab-smaller", "vocab_size=100", "wrong-answer", vocab_size=100),
    config_case("moe-experts-string", "num_experts is '4'", model="moe", num_experts="4"),
    config_case("moe-hidden", "hidden_size=32", "wrong-answer", model="moe", hidden_size=32, head_dim=8),
    config_case("moe-inter-zero", "moe_intermediate_size is 0", model="moe", moe_intermediate_size=0),
    # -- the shard index: wrong types (tracebacks) and paths leaving the model directory (security) --
    index_case("traceback", "weight-map-list", "weight_map is list", weight_map(["model-00001-of-00002.safetensors"])),
    index_case("traceback", "weight-map-string", "weight_map is str", weight_map("model.safetensors")),
    index_case("traceback", "weight-map-null", "weight_map is NoneType", weight_map(None)),
    index_case("traceback", "weight-map-empty", "weight_map is dict, not a non-empty", weight_map({})),
    index_case("traceback", "top-level-list", "no weight_map",
               lambda m: write(m / "model.safetensors.index.json", "[]") and m),
    index_case("traceback", "nested", "no weight_map",
               lambda m: write(m / "model.safetensors.index.json", deep_json()) and m),
    index_case("traceback", "shard-number", "names shard 5", lambda m: set_shard(m, 5)),
    index_case("traceback", "shard-empty", "names shard ''", lambda m: set_shard(m, "")),
    index_case("traceback", "shard-long-name", "too long", lambda m: set_shard(m, LONG_NAME)),
    index_case("security", "absolute", "not a file name inside the model directory", lambda m: set_shard(m, "/etc/passwd")),
    index_case("security", "absolute-real-shard", "not a file name inside",
               lambda m: set_shard(m, lambda m: str(next(m.glob("*.safetensors")).resolve()))),
    index_case("security", "dotdot", "not a file name inside", lambda m: set_shard(m, "../elsewhere.safetensors")),
    index_case("security", "dotdot-inner", "not a file name inside", lambda m: set_shard(m, "sub/../../x.safetensors")),
    index_case("security", "symlink-out", "resolves outside", symlinked_shard),
    # -- weights that would be cast to garbage --
    index_case("wrong-answer", "dtype-int16", "is I16", lambda m: retype_tensor(m, "int16")),
    index_case("wrong-answer", "dtype-int8", "is I8", lambda m: retype_tensor(m, "int8")),
    index_case("wrong-answer", "dtype-float64", "is F64", lambda m: retype_tensor(m, "float64")),
    index_case("wrong-answer", "dtype-fp8", "is F8_E4M3", lambda m: retype_tensor(m, "float8_e4m3fn")),
    # -- paths the OS refuses to look up --
    ("traceback", "path-model-long-name",
     lambda env, tmp: (alloc(tmp / LONG_NAME, env, tmp), "too long")),
    ("traceback", "path-model-too-deep",
     lambda env, tmp: (alloc(tmp / (("d" * 200 + "/") * 25), env, tmp), "too long")),
    ("traceback", "path-calib-long-name",
     lambda env, tmp: (with_calib(alloc(env.llama, env, tmp), tmp / LONG_NAME), "too long")),
    ("traceback", "path-plan-long-name", lambda env, tmp: (["show", tmp / LONG_NAME], "too long")),
    ("traceback", "path-scores-long-name",
     lambda env, tmp: (["allocate", env.llama, "--budget", "3", "--scores", tmp / LONG_NAME, "-o", tmp / "o.json"],
                       "too long")),
    ("traceback", "path-eval-text-long-name",
     lambda env, tmp: (evaluate(env, tmp, text=tmp / (LONG_NAME + ".txt")), "too long")),
    ("traceback", "path-diff-long-name",
     lambda env, tmp: (["diff", env.plan, tmp / LONG_NAME], "too long")),
    # -- calibration text --
    text_case("traceback", "jsonl-int", "c.jsonl", '{"text": 5}\n', "'text' is int"),
    text_case("traceback", "jsonl-null", "c.jsonl", '{"text": null}\n', "'text' is NoneType"),
    text_case("traceback", "jsonl-list", "c.jsonl", '{"text": ["a", "b"]}\n', "'text' is list"),
    text_case("traceback", "jsonl-object", "c.jsonl", '{"text": {"a": 1}}\n', "'text' is dict"),
    text_case("traceback", "jsonl-line-list", "c.jsonl", '[1, 2]\n', "a list without 'text'"),
    text_case("traceback", "jsonl-line-string", "c.jsonl", '"hello"\n', "a str without 'text'"),
    text_case("traceback", "jsonl-no-text", "c.jsonl", '{"body": "x"}\n', "a dict without 'text'"),
    text_case("traceback", "jsonl-second-line", "c.jsonl", '{"text": "ok"}\n{"text": 1.5}\n', "c.jsonl:2"),
    text_case("traceback", "jsonl-not-json", "c.jsonl", '{"text": \n', "not valid JSON"),
    # cut by the text limit that --calib-tokens sets (then "no text") or refused as JSON: one line either way
    text_case("traceback", "jsonl-nested", "c.jsonl", deep_json() + "\n", "c.jsonl"),
    text_case("traceback", "xz-corrupt", "c.txt.xz", b"\xfd7zXZ\x00garbage", "cannot read"),
    text_case("traceback", "gz-truncated", "c.txt.gz", lambda: gzip.compress(b"def f(): pass\n" * 1000)[:60],
              "cannot read"),
    text_case("traceback", "not-utf8", "c.txt", b"\xff\xfe\xfa" * 100, "cannot read"),
    text_case("traceback", "empty-xz", "c.txt.xz", lambda: lzma.compress(b""), "no text"),
    # -- numeric options: calibration --
    option_case("wrong-answer", "calib-tokens-zero", "--calib-tokens 0", "--calib-tokens", 0),
    option_case("wrong-answer", "calib-tokens-negative", "--calib-tokens -5", "--calib-tokens", -5),
    option_case("wrong-answer", "calib-tokens-below-window", "less than one window", "--calib-tokens", 100),
    option_case("traceback", "seqlen-zero", "--seqlen 0", "--seqlen", 0),
    option_case("traceback", "seqlen-negative", "--seqlen -1", "--seqlen", -1),
    option_case("unbounded", "calib-tokens-huge", "at most", "--calib-tokens", 2**40),
    option_case("traceback", "seed-negative", "--seed -1", "--seed", -1),
    option_case("traceback", "device-unknown", "unknown device 'gpu'", "--device", "gpu"),
    option_case("traceback", "device-garbage", "unknown device", "--device", "cuda:x"),
    option_case("traceback", "candidates-zero-bits", "0 bits is out of range", "--candidates", "0,4"),
    option_case("traceback", "candidates-nine-bits", "9 bits is out of range", "--candidates", "2,9"),
    option_case("traceback", "candidates-sixteen-bits", "16 bits is out of range", "--candidates", "16"),
    option_case("traceback", "candidates-group-zero", "group size 0", "--candidates", "2g0"),
    option_case("unbounded", "candidates-group-1e20", "group size 100000000000000000000", "--candidates",
                "2g100000000000000000000"),
    option_case("unbounded", "candidates-group-2e6", "group size 2000000", "--candidates", "4g2000000"),
    option_case("traceback", "candidates-empty", "cannot parse --candidates", "--candidates", ""),
    option_case("traceback", "candidates-garbage", "cannot parse --candidates", "--candidates", "2,x"),
    option_case("traceback", "candidates-5000-digits", "cannot parse --candidates", "--candidates", "9" * 5000),
    option_case("wrong-answer", "candidates-duplicate", "lists a candidate twice", "--candidates", "2,2"),
    # -- numeric options: budgets --
    budget_case("1e300TB", "between 1 B and"),
    budget_case("1e300", "not a plausible bits-per-parameter"),
    budget_case("9" * 400 + "MB", "cannot parse budget"),
    budget_case("1e30MB", "between 1 B and"),
    budget_case("9" * 400, "cannot parse budget"),
    budget_case("0", "not a plausible"),
    budget_case("-1", "cannot parse"),
    budget_case("nan", "cannot parse"),
    budget_case("inf", "cannot parse"),
    budget_case("0.1B", "between 1 B and"),
    budget_case("3XB", "unknown budget unit"),
    # -- numeric options: frontier --
    frontier_case("traceback", "step-nan", "--step nan", "--step", "nan"),
    frontier_case("traceback", "to-inf", "--to inf", "--to", "inf"),
    frontier_case("traceback", "from-nan", "--from nan", "--from", "nan"),
    frontier_case("traceback", "step-zero", "--step 0", "--step", 0),
    frontier_case("traceback", "step-negative", "--step -0.1", "--step", -0.1),
    frontier_case("unbounded", "step-1e-9", "over 10000 budgets", "--step", 1e-9),
    frontier_case("unbounded", "step-denormal", "over 10000 budgets", "--step", 1e-320),
    frontier_case("wrong-answer", "from-zero", "0 < bpp <= 32", "--from", 0),
    frontier_case("wrong-answer", "to-100", "0 < bpp <= 32", "--to", 100),
    frontier_case("wrong-answer", "reversed", "--from <= --to", "--from", 4, "--to", 2),
    # -- numeric options: eval --
    eval_case("traceback", "bits-zero", "0 bits is out of range", "--bits", 0),
    eval_case("traceback", "bits-16", "16 bits is out of range", "--bits", 16),
    eval_case("traceback", "bits-negative", "-1 bits is out of range", "--bits", -1),
    eval_case("traceback", "group-zero", "group size 0", "--bits", 3, "--group", 0),
    eval_case("traceback", "group-negative", "group size -1", "--bits", 3, "--group", -1),
    eval_case("unbounded", "group-huge", "group size 1000000000000", "--bits", 3, "--group", 10**12),
    eval_case("wrong-answer", "tokens-zero", "--tokens 0", "--tokens", 0),
    eval_case("traceback", "seqlen-zero", "--seqlen 0", "--seqlen", 0),
    eval_case("unbounded", "seqlen-over-positions", "max_position_embeddings 256", "--tokens", 2048, "--seqlen", 2048),
    eval_case("wrong-answer", "tokens-below-window", "less than one window", "--tokens", 100),
    eval_case("traceback", "device-unknown", "unknown device", "--device", "tpu"),
    # -- pins and bit ranges --
    option_case("traceback", "pin-bad-regex", "invalid regular expression", "--pin", "(=4", scores=True),
    option_case("traceback", "range-bad-regex", "invalid regular expression", "--bits-range", "[=4:8", scores=True),
    option_case("traceback", "pin-99-bits", "99 bits is out of range", "--pin", "q_proj=99", scores=True),
    option_case("traceback", "pin-zero-bits", "0 bits is out of range", "--pin", "q_proj=0", scores=True),
    option_case("unbounded", "pin-huge-group", "is out of range; use 1 to 1048576", "--pin", "q_proj=4g" + "1" + "0" * 20,
                scores=True),
    option_case("traceback", "pin-5000-digits", "out of range", "--pin", "q_proj=" + "9" * 5000, scores=True),
    option_case("wrong-answer", "min-bits-zero", "--min-bits 0", "--min-bits", 0, scores=True),
    option_case("wrong-answer", "max-bits-99", "--max-bits 99", "--max-bits", 99, scores=True),
    option_case("traceback", "role-bits-out-of-range", "out of range", "--role-bits", "attn_v=0:9", scores=True),
    option_case("traceback", "range-5000-digits", "out of range", "--bits-range", "x=" + "9" * 5000, scores=True),
    option_case("wrong-answer", "time-budget-negative", "--time-budget", "--time-budget", -1, scores=True),
    option_case("wrong-answer", "time-budget-nan", "--time-budget", "--time-budget", "nan", scores=True),
    # -- plans checked against the checkpoint --
    plan_case("wrong-answer", "missing-entry", "has no entry for", drop_entry),
    plan_case("wrong-answer", "wrong-shape", "the checkpoint has attn_o", reshape_entry),
    plan_case("wrong-answer", "norm-quantized", "stays at 16 bit", quantize_norm),
    plan_case("wrong-answer", "role-swapped", "is mlp_down", swap_role),
    plan_case("wrong-answer", "unknown-tensor", "does not have", rename_entry),
    plan_case("unbounded", "group-1e9", "group_size 1000000000", huge_group),
    plan_case("wrong-answer", "missing-entry", "has no entry for", drop_entry, command="quantize"),
    plan_case("unbounded", "group-1e9", "group_size 1000000000", huge_group, command="quantize"),
    plan_case("traceback", "bits-99", "not a valid plan", lambda d: d["candidates"][0].update(bits=99), command="show"),
    plan_case("traceback", "entries-string", "not a valid plan", lambda d: d.update(entries="x"), command="show"),
    plan_case("traceback", "shape-string", "not a valid plan", lambda d: first_quantized(d).update(shape="64"),
              command="show"),
    plan_case("traceback", "budget-list", "not a valid plan", lambda d: d.update(budget=[]), command="show"),
    raw_plan("traceback", "nested-100k", '{"format": "bitalloc.plan", "x": ' + deep_json() + "}", "nested too deeply"),
    raw_plan("traceback", "list", "[]", "not a bitalloc plan"),
    raw_plan("traceback", "infinite-number", '{"format": "bitalloc.plan", "version": 1e400}', "plan version"),
    ("traceback", "plan-show-not-utf8", lambda env, tmp: (["show", write(tmp / "p.json", b"\xff\xfe")], "not valid JSON")),
    ("wrong-answer", "plan-eval-other-model",
     lambda env, tmp: (evaluate(env, tmp, "--plan", env.moe_plan), "different model")),
    # -- score files --
    scores_case("traceback", "bits-99", "not a valid score file",
                header=lambda h: h["candidates"][0].update(bits=99)),
    scores_case("traceback", "meta-list", "'meta' is list", header=lambda h: h.update(meta=[1])),
    scores_case("traceback", "meta-string", "'meta' is str", header=lambda h: h.update(meta="x")),
    scores_case("traceback", "meta-calibration-list", "'meta.calibration' is list",
                header=lambda h: h["meta"].update(calibration=[1])),
    scores_case("traceback", "meta-sequences-string", "'meta.calib_sequences' is str",
                header=lambda h: h["meta"].update(calib_sequences="8")),
    scores_case("traceback", "tensors-string", "'tensors' is not a list", header=lambda h: h.update(tensors="abc")),
    scores_case("traceback", "candidates-empty", "'candidates' is not a non-empty", header=lambda h: h.update(candidates=[])),
    scores_case("traceback", "header-list", "not a bitalloc score file", header=lambda h: "[1]"),
    scores_case("traceback", "header-nested", "not a bitalloc score file", header=lambda h: deep_json()),
    scores_case("traceback", "offsets-backwards", "do not start at 0 and increase",
                arrays=set_array("slab_offsets", lambda a: a[::-1].copy())),
    scores_case("traceback", "offsets-short", "slab_offsets has shape", arrays=set_array("slab_offsets", lambda a: a[:-1].copy())),
    scores_case("traceback", "offsets-float", "slab_offsets has shape", arrays=set_array("slab_offsets", lambda a: a.astype(np.float64))),
    scores_case("traceback", "offsets-past-end", "score.", arrays=set_array("slab_offsets", lambda a: a * 2)),
    scores_case("traceback", "tokens-short", "tokens has shape", arrays=set_array("tokens", lambda a: a[:-1].copy())),
    scores_case("wrong-answer", "negative-error", "a negative error", arrays=lambda d: first_score(d, -36.0)),
    scores_case("wrong-answer", "nan-error", "non-finite errors", arrays=lambda d: first_score(d, float("nan"))),
    scores_case("wrong-answer", "inf-error", "non-finite errors", arrays=lambda d: first_score(d, float("inf"))),
    scores_case("traceback", "score-shape", "has shape",
                arrays=lambda d: d.update({next(k for k in d if k.startswith("score.")): np.zeros((3, 1))})),
    # -- plans and scores of different models mixed --
    ("wrong-answer", "cross-diff-plans", lambda env, tmp: (["diff", env.plan, env.moe_plan], "different models")),
    ("wrong-answer", "cross-diff-scores",
     lambda env, tmp: (["diff", env.plan, env.plan, "--scores", env.moe_scores], "different checkpoint")),
    ("wrong-answer", "cross-allocate-scores",
     lambda env, tmp: (["allocate", env.llama, "--budget", "3", "--scores", env.moe_scores, "-o", tmp / "o.json"],
                       "different checkpoint")),
    ("wrong-answer", "cross-import-scores",
     lambda env, tmp: (["import", write(tmp / "c.json", json.dumps({"bits": 4, "group_size": 128})), "--model",
                        env.llama, "-o", tmp / "o.json", "--scores", env.moe_scores], "different checkpoint")),
    # -- exporters: every width exports or is refused --
    ("traceback", "export-llamacpp-1-bit", export_widths(1)),
    ("traceback", "export-llamacpp-7-bit", export_widths(7)),
    # -- importers --
    import_case("wrong-answer", "nothing-quantized-gptq", {"bits": 4, "group_size": 128, "dynamic": {"-:.*": {}}},
                "quantizes no tensor"),
    import_case("wrong-answer", "nothing-quantized-autoround", "AUTOROUND_ALL_16", "quantizes no tensor"),
    import_case("traceback", "gptq-bits-99", {"bits": 99, "group_size": 128}, "bits=99 group_size=128 cannot be imported"),
    import_case("traceback", "gptq-group-zero", {"bits": 4, "group_size": 0}, "group_size=0 cannot be imported"),
    import_case("traceback", "gptq-dynamic-bits-0", {"bits": 4, "group_size": 128, "dynamic": {".*q_proj": {"bits": 0}}},
                "bits=0 group_size=128 cannot be imported"),
    import_case("traceback", "gptq-dynamic-not-object", {"bits": 4, "group_size": 128, "dynamic": {".*q_proj": 3}},
                "not a GPTQModel quantize_config"),
    import_case("traceback", "gptq-dynamic-bad-regex", {"bits": 4, "group_size": 128, "dynamic": {"(": {"bits": 2}}},
                "invalid regular expression"),
    import_case("traceback", "ct-bits-99", {"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 99, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}}}}, "bits=99"),
    import_case("traceback", "ct-garbage", {"config_groups": {"g": 5}}, "not a valid compressed-tensors config"),
    import_case("traceback", "not-object", [1, 2], "expected a JSON object"),
]


def _autoround_all_16(env: Env) -> dict:
    from bitalloc.model.checkpoint import Checkpoint
    from bitalloc.model.inventory import build_inventory

    return {u.module: {"bits": 16} for u in build_inventory(Checkpoint(env.llama)).quantized}


def _materialize(build: Callable, env: Env, tmp: Path) -> tuple[list, str]:
    args, needle = build(env, tmp)
    cfg = next((a for a in args if isinstance(a, Path) and a.name == "cfg.json"), None)
    if cfg is not None and cfg.read_text() == '"AUTOROUND_ALL_16"':
        cfg.write_text(json.dumps(_autoround_all_16(env)))
    return args, needle


@pytest.mark.parametrize("build", [c[2] for c in CASES], ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_refused_in_one_line(build, env, tmp_path, tmpdir_env):
    args, needle = _materialize(build, env, tmp_path)
    inputs = [a for a in args if isinstance(a, Path) and _exists(a)] + [env.root, env.llama, env.moe]
    before = {p: digest(p) for p in inputs}
    outputs_before = set(tmp_path.rglob("*"))
    r = runner.invoke(app, [str(a) for a in args])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2, (r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    assert needle in lines[0], lines[0]
    assert {p: digest(p) for p in inputs} == before, "an input was changed"
    assert set(tmp_path.rglob("*")) == outputs_before, "something was written"
    assert list(tmpdir_env.iterdir()) == [], "a temporary file was left in $TMPDIR"


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:
        return False


def test_case_table_covers_every_category():
    counts: dict[str, int] = {}
    for category, _, _ in CASES:
        counts[category] = counts.get(category, 0) + 1
    assert set(counts) == {"traceback", "wrong-answer", "unbounded", "security"}
    assert len(CASES) >= 100 and len({c[1] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_the_schema_allows_exports_or_is_refused(bits, env, tmp_path):
    from bitalloc.export import FORMATS, export_plan

    build = export_widths(bits)
    args, _ = build(env, tmp_path)
    plan = Plan.load(args[1])
    for fmt in FORMATS:
        try:
            text, _ = export_plan(plan, fmt)
        except BitallocError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert text


# ---- bounded resources, measured -------------------------------------------------------------------------------

PEAK_RSS_BOUND_MB = 1500  # torch + transformers alone take ~700 MB here; the bomb read fully took 4.7 GB


def _peak_rss_mb(args: list, tmpdir: Path) -> tuple[int, float, str]:
    """Run the CLI in a subprocess; (exit code, peak resident memory in MB of that process, stderr)."""
    code = ("import resource, sys\nfrom bitalloc.cli import main\nsys.argv = ['bitalloc'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\nelse:\n    rc = 0\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmpdir)}, timeout=300)
    peak = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK"))
    return r.returncode, peak / 1024, r.stderr


def test_decompression_bomb_reads_only_what_the_tokens_need(env, tmp_path, tmpdir_env):
    bomb = tmp_path / "bomb.txt.xz"
    with lzma.open(bomb, "wb", preset=9) as f:
        line = b"def f(x): return x\n" * 512
        for _ in range(64 * 2**20 // len(line)):
            f.write(line)
    assert bomb.stat().st_size < 64 * 2**10  # kilobytes on disk, 64 MB of text
    before = digest(bomb)
    rc, peak, err = _peak_rss_mb(["eval", env.llama, "--text", bomb, "--tokens", 256, "--seqlen", 128, "-q",
                                  "--device", "cpu"], tmpdir_env)
    assert rc == 0, err
    assert peak < PEAK_RSS_BOUND_MB, f"peak {peak:.0f} MB"
    assert digest(bomb) == before and list(tmpdir_env.iterdir()) == []
    print(f"decompression bomb: peak RSS {peak:.0f} MB")


def test_plan_with_a_huge_group_allocates_nothing(env, tmp_path, tmpdir_env):
    p = edit_json(Path(shutil.copy(env.plan, tmp_path / "plan.json")), huge_group)
    rc, peak, err = _peak_rss_mb(evaluate(env, tmp_path, "--plan", p), tmpdir_env)
    assert rc == 2 and "group_size 1000000000" in err, err
    assert peak < PEAK_RSS_BOUND_MB, f"peak {peak:.0f} MB"
    print(f"huge group: peak RSS {peak:.0f} MB")


# ---- property-based: the parsers raise nothing but BitallocError ------------------------------------------------

_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_BUDGET_PARTS = st.sampled_from(["", "0", "1", "2.5", ".5", "1e300", "1e-300", "-", "+", "e", "E", ".", "nan", "inf",
                                 "bpp", "bpw", "B", "kB", "MB", "GiB", "TB", "TiB", "XB", " ", "9" * 30, "\x00", "é"])


@_FAST
@given(st.one_of(st.lists(_BUDGET_PARTS, max_size=6).map("".join), st.text(max_size=40),
                 st.floats(allow_nan=True, allow_infinity=True), st.integers()))
def test_parse_budget_raises_only_budget_errors(text):
    from bitalloc.budget import parse_budget

    try:
        b = parse_budget(text)
    except BitallocError:
        return
    assert b.value > 0 and np.isfinite(b.value)
    b.total_bits(10**9)


_CAND_PARTS = st.sampled_from(["", "0", "1", "2", "4", "8", "9", "16", "g", "g0", "g1", "g64", "g128", "g" + "9" * 25,
                               "s", ",", " ", "-", "x", "9" * 30])


@_FAST
@given(st.one_of(st.lists(_CAND_PARTS, max_size=8).map("".join), st.text(max_size=30)))
def test_parse_candidates_raises_only_bitalloc_errors(text):
    from bitalloc.api.config import CalibrationConfig, parse_candidates

    try:
        cands = parse_candidates(text)
        CalibrationConfig(tokens=512, seqlen=128, candidates=tuple(cands))
    except BitallocError:
        return
    assert all(1 <= c.bits <= 8 and 1 <= c.group_size <= 2**20 for c in cands)


_JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=8))
_JSON = st.recursive(_JSON_LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                          st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                     max_leaves=8)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (to pick where a mutation lands)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, prefix + (i,))
    return out


@pytest.fixture(scope="module")
def plan_doc(env) -> dict:
    return json.loads(env.plan.read_text())


@_FAST
@given(data=st.data())
def test_plan_load_raises_only_plan_errors(plan_doc, tmp_path_factory, data):
    doc = json.loads(json.dumps(plan_doc))
    if data.draw(st.booleans()):  # half the examples go through the version-1 migration
        doc["version"] = 1
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            action = data.draw(st.sampled_from(["replace", "delete"]))
            if action == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):
            continue
    p = tmp_path_factory.getbasetemp() / "fuzzed-plan.json"
    p.write_text(json.dumps(doc))
    try:
        plan = Plan.load(p)
    except BitallocError:
        return
    plan.summary()
