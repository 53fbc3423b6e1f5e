"""Write a quantized model as a Hugging Face directory in compressed-tensors' ``pack-quantized`` format.

Why this format: it is what transformers (through compressed-tensors), llm-compressor and vLLM read,
so a bitalloc checkpoint needs no bitalloc to be loaded. Per quantized module the shards hold
``weight_packed`` (int32), ``weight_scale`` (fp16), ``weight_zero_point`` (int32, asymmetric
schemes only: compressed-tensors drops it for symmetric ones) and ``weight_shape``; the packing
is the library's own ``pack_to_int32`` (see :mod:`.checkpoint` for the code convention).

What else goes in OUT: ``config.json`` (the input's, plus the ``quantization_config`` that
:func:`bitalloc.export.compressed_tensors.export` builds from the plan, every group switched to
``pack-quantized``), every other tensor copied unchanged from the input shards (embeddings, norms,
routers, lm_head), tokenizer files, the plan (``bitalloc-plan.json``) and provenance
(``bitalloc-provenance.json``). Fused 3-D expert tensors are written per expert, under the names
the plan uses (``mlp.experts.E.gate_proj``), which is the layout transformers converts on load.

A plan with a BitsMoE ``decomposition`` stores those experts as shared bases and factor slabs instead
(:mod:`.decomposed`); ``quantization_config`` then covers the other modules, and ``config.json`` names the
model_type ``bitalloc_bitsmoe`` (the original one under ``bitalloc_decomposition``) so that plain
transformers refuses the directory rather than initializing the experts it cannot find at random.

Safety: OUT is assembled in a temporary directory beside it and renamed into place at the end, so
an exception or an interrupt leaves nothing at OUT (and removes the temporary directory); an
existing OUT is refused unless ``overwrite``; the input directory is only read. Memory: tensors are
read one at a time and written in shards of at most ``shard_bytes``, so at most one shard is held.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OutputError, PlanError
from ..model.checkpoint import DECOMPOSED_KEY, DECOMPOSED_MODEL_TYPE, Checkpoint
from ..plan import Entry, Plan, Role
from ..progress import SILENT, Tracker
from .base import Quantized, QuantizedWeight
from .checkpoint import FORMAT, pack
from .decomposed import block_tensors, check_writable
from .lowrank import StoredBlock

PLAN_FILE = "bitalloc-plan.json"
PROVENANCE_FILE = "bitalloc-provenance.json"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 2 * 2**30
# tokenizer and generation files a model directory may carry (never code: trust_remote_code is not used)
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
             "generation_config.json")


def quantization_config(plan: Plan) -> dict[str, Any]:
    """The plan's compressed-tensors ``quantization_config`` with every group stored ``pack-quantized``.

    The export builds the groups, targets and ignore list; it marks 2/3-bit groups
    ``naive-quantized`` (and warns) for older compressed-tensors, but the installed library packs
    every width from 1 to 8 bits, and this writer packs them all. Refuses plans with segments or
    with q/k/v (gate/up) split across widths (:class:`PlanError`).
    """
    from ..export.compressed_tensors import export

    _refuse_unwritable(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = export(plan)
    for group in cfg["config_groups"].values():
        group["format"] = FORMAT
    cfg["format"] = FORMAT
    return cfg


def _refuse_unwritable(plan: Plan) -> None:
    """Segments, partial groups and quantized embeddings have no pack-quantized form; say so before any work."""
    check_writable(plan)
    for e in plan.entries:
        if e.decomposed:
            continue
        if e.segments:
            raise PlanError(f"the pack-quantized format stores one width per module; the plan splits {e.tensor} into "
                            f"{len(e.segments)} column segments (--granularity slab). Re-plan with --granularity "
                            "tensor or expert to write a checkpoint.")
        if e.role == Role.embedding and not e.locked:
            raise PlanError(f"the plan quantizes the embedding {e.tensor}, which compressed-tensors loaders keep in "
                            "16 bit; re-plan without --include-embeddings, without a pin on it, and (tied embeddings) "
                            "without --include-lm-head to write a checkpoint")
        if not e.locked and e.shape[-1] % e.group_size:
            raise PlanError(f"{e.tensor} has {e.shape[-1]} input columns, not a multiple of its group size "
                            f"{e.group_size}; compressed-tensors (and vLLM) dequantize whole groups only. Re-plan "
                            f"with candidates whose groups divide {e.shape[-1]} (e.g. --candidates 2g32,3g32,4g32,8g32)")
        if e.source is not None and e.locked:
            raise PlanError(f"{e.tensor} is locked inside the fused expert tensor {e.source.key}; a checkpoint "
                            "written per expert needs every expert quantized")


def preflight(ckpt: Checkpoint, plan: Plan, out: str | os.PathLike, overwrite: bool) -> tuple[dict[str, Any], Path]:
    """Every refusal that needs no weights, so ``quantize`` meets them before calibrating: the plan's
    ``quantization_config`` and OUT's absolute path."""
    qcfg = quantization_config(plan)
    if "quantization_config" in ckpt.config:
        raise CheckpointError(f"{ckpt.path} is already quantized (its config.json has a quantization_config); "
                              "quantize the original 16-bit model")
    return qcfg, check_output(out, ckpt, overwrite)


def check_output(out: str | os.PathLike, ckpt: Checkpoint, overwrite: bool) -> Path:
    """OUT resolved (symlinks followed: a linked OUT is written at its target), refused (``OutputError``) if it
    overlaps the input model, exists without ``overwrite``, or exists as anything but a directory (``overwrite``
    replaces a directory only: never a file or a device someone named by mistake). ``bitalloc.api.quantize``
    also checks OUT against its other inputs (``bitalloc.api.outputs``), which only it knows."""
    out = Path(os.path.realpath(out))
    src = Path(os.path.realpath(ckpt.path))
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"output {out} overlaps the input model {src}; write the quantized model elsewhere")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; choose another path")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; choose another path or pass overwrite=True (--overwrite)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the parent directory of {out}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write into {out.parent}: permission denied")
    return out


def write_quantized(ckpt: Checkpoint, plan: Plan, weights: Mapping[str, Quantized], out_dir: str | os.PathLike,
                    provenance: dict[str, Any], overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                    track: Tracker = SILENT, blocks: Mapping[str, StoredBlock] | None = None) -> Path:
    """Write ``weights`` (tensor name -> QuantizedWeight, one per unlocked plan entry that is not decomposed),
    ``blocks`` (basis name -> stored form of each block of the plan's decomposition, if it has one) and ``ckpt``'s
    other tensors to ``out_dir``; returns its path.

    The caller checks that ``plan`` belongs to ``ckpt`` (``check_plan_matches``); here the weights are
    checked against the plan (names, shapes, widths, groups) as they are written.
    """
    t0 = time.perf_counter()
    qcfg, out = preflight(ckpt, plan, out_dir, overwrite)
    blocks = blocks or {}
    planned = [b.basis for b in plan.decomposition.blocks] if plan.decomposition else []
    if sorted(blocks) != sorted(planned):
        raise PlanError(f"the decomposed blocks given ({len(blocks)}) are not the plan's ({len(planned)}): "
                        "decompose the experts by this plan (rounding.decomposed.decompose_checkpoint)")
    decomposed = {e.tensor for e in plan.entries if e.decomposed}
    quantized = {e.tensor: e for e in plan.entries if not e.locked and not e.decomposed}
    missing = sorted(set(quantized) - set(weights))
    extra = sorted(set(weights) - set(quantized))
    if missing or extra:
        name = (missing or extra)[0]
        raise PlanError(f"the quantized weights do not follow the plan: {name} is "
                        f"{'missing' if missing else 'not a quantized tensor of the plan'}")
    absent = [e.tensor for e in quantized.values() if e.source is None and e.tensor not in ckpt.tensors]
    if absent:
        raise PlanError(f"the plan quantizes {absent[0]}, which {ckpt.path} does not have; re-plan for this model")
    fused = _fused_members(plan, ckpt)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = ShardWriter(tmp, shard_bytes)
        task = track.task("write checkpoint", len(ckpt.tensors))
        for name in ckpt.tensors:
            if name in fused:
                for e in fused[name]:
                    if not e.decomposed:
                        shards.add_module(e.module, _packed(e, weights[e.tensor]))
            elif name in quantized:
                e = quantized[name]
                shards.add_module(e.module, _packed(e, weights[name]))
            elif name not in decomposed:
                shards.add(name, ckpt.load(name))
            task.advance()
        for b in plan.decomposition.blocks if plan.decomposition else []:
            for name, t in block_tensors(b, blocks[b.basis]):
                shards.add(name, t)
        shards.finish()
        _write_json(tmp / "config.json", _config(ckpt, plan, qcfg))
        for f in AUX_FILES:
            if (ckpt.path / f).is_file():
                shutil.copyfile(ckpt.path / f, tmp / f)
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        _write_json(tmp / PROVENANCE_FILE, _provenance(provenance, ckpt, len(quantized), time.perf_counter() - t0))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _config(ckpt: Checkpoint, plan: Plan, qcfg: dict[str, Any]) -> dict[str, Any]:
    """The input's config.json with ``qcfg``; for a decomposed plan, marked so that only bitalloc loads it."""
    config = {**ckpt.config, "quantization_config": qcfg}
    if plan.decomposition is not None:
        config.update({"model_type": DECOMPOSED_MODEL_TYPE, DECOMPOSED_KEY: {
            "model_type": ckpt.arch, "method": plan.decomposition.method, "plan": PLAN_FILE,
            "load_with": "bitalloc.api.quantization.load_quantized (docs/checkpoint.md)"}})
    return config


def _fused_members(plan: Plan, ckpt: Checkpoint) -> dict[str, list[Entry]]:
    """Fused 3-D expert tensors of the input -> the per-expert entries written in their place (all of them)."""
    members: dict[str, list[Entry]] = {}
    for e in plan.entries:
        if e.source is not None:
            members.setdefault(e.source.key, []).append(e)
    for key, es in members.items():
        info = ckpt.tensors.get(key)
        per_expert = 2 if {e.source.part for e in es} & {"gate", "up"} else 1
        if info is None or len(info.shape) != 3 or len(es) != info.shape[0] * per_expert:
            raise PlanError(f"the plan lists {len(es)} expert tensors inside {key}, which holds "
                            f"{info.shape[0] * per_expert if info else 0}; re-plan for this model")
    return members


def _packed(entry: Entry, q: Quantized) -> dict[str, torch.Tensor]:
    """The module's pack-quantized tensors, after checking that ``q`` is what the plan asked for."""
    if not isinstance(q, QuantizedWeight):
        raise PlanError(f"{entry.tensor} is split into column runs; the pack-quantized format stores one width")
    got = (list(q.codes.shape), q.bits, q.group_size, q.symmetric)
    want = (entry.shape, entry.bits, entry.group_size, entry.symmetric)
    if got != want:
        raise PlanError(f"the quantized weight of {entry.tensor} (shape, bits, group, symmetric) = {got} does not "
                        f"follow the plan's {want}")
    return pack(q, entry.tensor)


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a tensor larger than that gets its own).

    Shards are numbered as they fill and renamed ``model-0000i-of-0000n.safetensors`` by :meth:`finish`,
    which writes the index; only the shard being filled is held in memory.
    """

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = t.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def add_module(self, module: str, tensors: dict[str, torch.Tensor]) -> None:
        for local, t in tensors.items():
            self.add(f"{module}.{local}", t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, str(self.directory / self._name(len(self._files))), metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    @staticmethod
    def _name(i: int, n: int | None = None) -> str:
        return f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n else f"model-{i + 1:05d}.partial.safetensors"

    def finish(self) -> None:
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files):
            final = self._name(i, n)
            os.replace(self.directory / self._name(i), self.directory / final)
            weight_map.update({name: final for name in names})
        _write_json(self.directory / INDEX_FILE, {"metadata": {"total_size": self.total_bytes},
                                                  "weight_map": dict(sorted(weight_map.items()))})


def _provenance(given: dict[str, Any], ckpt: Checkpoint, quantized: int, write_s: float) -> dict[str, Any]:
    from .. import __version__

    timings = {**given.get("timings", {}), "write_s": round(write_s, 3)}
    return {**given, "timings": timings, "bitalloc_version": __version__, "format": FORMAT,
            "source": {"path": str(ckpt.path), "config_sha256": ckpt.config_sha256, "index_sha256": ckpt.index_sha256},
            "quantized_tensors": quantized}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory to OUT; an existing OUT (overwrite) is moved aside first, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
