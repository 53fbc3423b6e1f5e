"""Read a pack-quantized checkpoint back: the integer codes, and a transformers model on ``QuantLinear``.

Every checkpoint is validated before use: ``config.json`` must carry a well-formed compressed-tensors
``quantization_config`` (parsed by the library's own classes, integer group schemes, ``pack-quantized``),
every packed module must match exactly one config group, and every tensor must have the shape its
scheme implies. Only safetensors and JSON are read, and transformers never runs remote code.

The model is built on the meta device from ``config.json`` alone, each quantized linear is replaced by
``bitalloc.kernels.QuantLinear`` built from its codes, and the remaining tensors (embeddings, norms,
routers, 16-bit heads) are assigned from the shards: weight memory is the packed codes plus the
16-bit tensors, never a dequantized copy of the model. transformers holds MoE experts fused in 3-D
parameters; a quantized experts module is replaced by :class:`QuantExperts`, the same computation
over per-expert ``QuantLinear`` modules, and a decomposed one (a BitsMoE plan: shared bases and factor
slabs, :mod:`.decomposed`) by ``bitalloc.kernels.LowRankExperts``, read by the plan the checkpoint carries.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, PlanError
from ..model.checkpoint import DECOMPOSED_KEY, DECOMPOSED_MODEL_TYPE, Checkpoint
from ..plan import DecomposedBlock, Decomposition, Plan
from .base import QuantizedWeight
from .checkpoint import FORMAT, PACKED_SUFFIXES, SCALE_DTYPE, unpack
from .decomposed import check_writable, experts_module, read_block, stored_names
from .lowrank import StoredBlock, kept_offsets
from .writer import PLAN_FILE


def read_quantization_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's ``quantization_config``, refused unless it is a pack-quantized integer group config."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    cfg = ckpt.config.get("quantization_config")
    where = ckpt.path / "config.json"
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} has no quantization_config: {ckpt.path} is not a quantized checkpoint")
    if cfg.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where}: quant_method {cfg.get('quant_method')!r} is not 'compressed-tensors'")
    try:
        parsed = QuantizationConfig.model_validate(cfg)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: quantization_config is malformed: {str(exc).splitlines()[0]}") from None
    if not parsed.config_groups:
        raise CheckpointError(f"{where}: quantization_config has no config_groups")
    for name, group in parsed.config_groups.items():
        w = group.weights
        fmt = group.format or cfg.get("format")
        strategy = str(getattr(w.strategy, "value", w.strategy)) if w else None
        if w is None or str(getattr(w.type, "value", w.type)) != "int" or strategy != "group" or fmt != FORMAT:
            raise CheckpointError(f"{where}: config group {name} is {fmt} {getattr(w, 'type', None)} "
                                  f"{strategy}; bitalloc reads pack-quantized integer group schemes (re-export it "
                                  "with bitalloc quantize)")
    return cfg


def load_quantized_weights(model: str | Path | Checkpoint) -> dict[str, QuantizedWeight]:
    """Tensor name (``<module>.weight``) -> QuantizedWeight of every packed module, validated and unpacked."""
    out = dict(iter_quantized_weights(model))
    if not out:
        raise CheckpointError(f"{model} holds no packed weights (no '*.weight_packed' tensor)")
    return out


def iter_quantized_weights(model: str | Path | Checkpoint) -> Iterator[tuple[str, QuantizedWeight]]:
    """The packed modules one at a time, so a loader holds one module's unpacked codes, not the model's."""
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    cfg, decomposition = read_quantization_config(ckpt), read_decomposition(ckpt)
    yield from _packed_modules(ckpt, cfg, _stored_by_decomposition(decomposition))


def _stored_by_decomposition(decomposition: Decomposition | None) -> set[str]:
    """Tensor names a decomposition stores (read through ``read_block``, not as packed modules)."""
    return stored_names(decomposition) if decomposition else set()


def _packed_modules(ckpt: Checkpoint, cfg: dict[str, Any], skip: set[str]) -> Iterator[tuple[str, QuantizedWeight]]:
    """``iter_quantized_weights`` on a checkpoint whose config and decomposition have been read."""
    from ..export.compressed_tensors import resolve

    for name in ckpt.tensors:
        if not name.endswith(".weight_packed") or name in skip:
            continue
        module = name.removesuffix(".weight_packed")
        tensors = {s: ckpt.load(f"{module}.{s}") for s in PACKED_SUFFIXES if f"{module}.{s}" in ckpt.tensors}
        cols = int(tensors["weight_shape"][-1]) if "weight_shape" in tensors else 0
        choice = resolve(cfg, module, cols)
        if choice is None:
            raise CheckpointError(f"{module} is stored packed but no config group of {ckpt.path / 'config.json'} "
                                  "quantizes it; the checkpoint is corrupt")
        yield f"{module}.weight", unpack(tensors, choice, module)


def read_decomposition(ckpt: Checkpoint) -> Decomposition | None:
    """The BitsMoE decomposition the checkpoint stores (from the plan it carries); None for a per-module one."""
    if ckpt.config.get("model_type") != DECOMPOSED_MODEL_TYPE:
        return None
    try:
        plan = Plan.load(ckpt.path / PLAN_FILE)
        check_writable(plan)
    except PlanError as exc:
        raise CheckpointError(f"{ckpt.path} stores decomposed experts, laid out by its {PLAN_FILE}, which cannot be "
                              f"read: {exc}") from None
    if plan.decomposition is None:
        raise CheckpointError(f"{ckpt.path / 'config.json'} says the experts are decomposed, but {PLAN_FILE} has no "
                              "decomposition; the checkpoint is corrupt")
    return plan.decomposition


def packed_bytes(model: str | Path | Checkpoint) -> int:
    """Bytes the quantized modules take in the shards (packed codes, scales, zero points, shapes)."""
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    total = 0
    for name in ckpt.tensors:
        if name.rpartition(".")[2] in PACKED_SUFFIXES:
            t = ckpt.load(name)
            total += t.numel() * t.element_size()
    return total


class QuantExperts(nn.Module):
    """transformers' fused MoE experts computation (same ``forward`` signature) over per-expert ``QuantLinear``."""

    def __init__(self, gate: list[nn.Module], up: list[nn.Module], down: list[nn.Module], act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.ModuleList(gate), nn.ModuleList(up), nn.ModuleList(down)
        self.act_fn = act_fn
        self.num_experts = len(gate)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = self.down_proj[e](self.act_fn(self.gate_proj[e](x)) * self.up_proj[e](x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def load_quantized_model(model: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM whose quantized linears are ``QuantLinear`` (other tensors in ``dtype``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Checkpoint(model)
    cfg = read_quantization_config(ckpt)  # before transformers reads the config
    decomposition = read_decomposition(ckpt)
    # built dense from the architecture's own config class (a decomposed checkpoint names a model_type of its own);
    # the quantized layers are put in below
    config_dict = {k: v for k, v in ckpt.config.items()
                   if k not in ("model_type", "quantization_config", DECOMPOSED_KEY)}
    try:
        config = AutoConfig.for_model(ckpt.arch, **config_dict)
    except Exception as exc:
        raise CheckpointError(f"transformers cannot read {ckpt.path / 'config.json'}: {exc}") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    skip = _stored_by_decomposition(decomposition)
    state = {n: ckpt.load(n, dtype) for n in ckpt.tensors
             if n.rpartition(".")[2] not in PACKED_SUFFIXES and n not in skip}
    _install(lm, _packed_modules(ckpt, cfg, skip), state)
    if decomposition is not None:
        _install_lowrank(lm, {b.basis: read_block(ckpt, b, decomposition) for b in decomposition.blocks},
                         decomposition)
    result = lm.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{ckpt.path} holds {result.unexpected_keys[0]!r}, which {config.model_type} has no "
                              "place for; the checkpoint does not match its config.json")
    lm.tie_weights()
    _rebuild_computed_buffers(lm, config)
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt.path} lacks {left[0]!r} (and {len(left) - 1} more tensors) needed by "
                              f"{config.model_type}")
    return lm.to(device).eval()


def _rebuild_computed_buffers(lm: nn.Module, config: Any) -> None:
    """Modules whose buffers are computed from the config, not stored (rotary ``inv_freq``), built for real.

    The meta-device skeleton leaves them empty, and no checkpoint holds them.
    """
    for name, module in list(lm.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and not any(True for _ in module.parameters()):
            parent, _, leaf = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, leaf, type(module)(config=config))


def _install(lm: nn.Module, weights: Iterator[tuple[str, QuantizedWeight]], state: dict[str, torch.Tensor]) -> None:
    """Replace every quantized linear (and every quantized experts module) by its QuantLinear form."""
    modules = dict(lm.named_modules())
    experts: dict[str, dict[str, dict[int, nn.Module]]] = {}
    found = False
    for tensor, q in weights:
        found = True
        name = tensor.removesuffix(".weight")
        layer = _quant_linear(q, state.pop(f"{name}.bias", None), name)
        target = modules.get(name)
        if isinstance(target, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent], leaf, layer)
            continue
        owner, index, proj = _expert_parts(name)
        if owner not in modules or target is not None:
            raise CheckpointError(f"{name} is quantized in the checkpoint, but the model has no linear of that name")
        experts.setdefault(owner, {}).setdefault(proj, {})[index] = layer
    if not found:
        raise CheckpointError("the checkpoint holds no packed weights (no '*.weight_packed' tensor)")
    for owner, projs in experts.items():
        old = modules[owner]
        n = getattr(old, "num_experts", None)
        lists = {p: [projs.get(p, {}).get(e) for e in range(n or 0)] for p in ("gate_proj", "up_proj", "down_proj")}
        missing = [f"{owner}.{e}.{p}" for p, ls in lists.items() for e, m in enumerate(ls) if m is None]
        if n is None or missing:
            raise CheckpointError(f"{owner}: every expert's gate, up and down projections must be quantized; "
                                  f"{missing[0] if missing else 'the module has no num_experts'} is not")
        parent, _, leaf = owner.rpartition(".")
        setattr(modules[parent], leaf, QuantExperts(lists["gate_proj"], lists["up_proj"], lists["down_proj"],
                                                    old.act_fn))


def _install_lowrank(lm: nn.Module, stored: dict[str, StoredBlock], decomposition: Decomposition) -> None:
    """Replace every decomposed experts module by ``LowRankExperts`` over its stored bases and factors."""
    from ..kernels import LowRankExperts

    modules = dict(lm.named_modules())
    by_owner: dict[str, dict[str, DecomposedBlock]] = {}
    for b in decomposition.blocks:
        by_owner.setdefault(experts_module(b), {})[b.projection] = b
    for owner, blocks in by_owner.items():
        old = modules.get(owner)
        if getattr(old, "num_experts", None) != len(blocks["gate"].experts):
            raise CheckpointError(f"the plan decomposes {len(blocks['gate'].experts)} experts of {owner}, which the "
                                  "model built from config.json does not have; the checkpoint does not match it")
        parts = {p: _lowrank_projection(b, stored[b.basis]) for p, b in blocks.items()}
        parent, _, leaf = owner.rpartition(".")
        setattr(modules[parent], leaf, LowRankExperts(parts["gate"], parts["up"], parts["down"], old.act_fn))


def _lowrank_projection(block: DecomposedBlock, stored: StoredBlock) -> nn.Module:
    """One block as ``SharedBasisFactors``: each stored slab placed at its rows of the kept basis."""
    from ..kernels import FactorSlab, SharedBasisFactors

    offsets = kept_offsets(block)
    experts = []
    for slabs in stored.factors:
        experts.append([FactorSlab(offsets[i], codes=rows.codes, scale=rows.scale.to(SCALE_DTYPE),
                                   zero=rows.zero.to(torch.uint8), group_size=rows.group_size)
                        if isinstance(rows, QuantizedWeight) else FactorSlab(offsets[i], values=rows)
                        for i, rows in sorted(slabs.items())])
    return SharedBasisFactors(stored.basis, experts, block.factor_cols)


def _expert_parts(name: str) -> tuple[str, int, str]:
    """``...mlp.experts.3.gate_proj`` -> (``...mlp.experts``, 3, ``gate_proj``)."""
    owner, _, rest = name.rpartition(".experts.")
    index, _, proj = rest.partition(".")
    if not owner or not index.isdigit() or proj not in ("gate_proj", "up_proj", "down_proj"):
        raise CheckpointError(f"{name} is quantized in the checkpoint, but the model has no linear of that name")
    return f"{owner}.experts", int(index), proj


def _quant_linear(q: QuantizedWeight, bias: torch.Tensor | None, name: str) -> nn.Module:
    from ..kernels import QuantLinear
    from ..kernels.codes import Codes

    try:
        codes = Codes(q.codes, q.scale.to(SCALE_DTYPE), q.zero.to(torch.uint8), q.bits, q.group_size)
    except ValueError as exc:
        raise CheckpointError(f"{name}: bitalloc's QuantLinear cannot hold it ({exc}); load this checkpoint with "
                              "transformers.AutoModelForCausalLM.from_pretrained instead") from None
    return QuantLinear.from_codes(codes, bias)
