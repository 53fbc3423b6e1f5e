"""Unit inventory: which checkpoint tensors are quantized, which stay locked, and why.

One unit per linear weight inside a decoder block (per expert for MoE), found from the
checkpoint's tensor names and shapes alone. Architectures are described as data (name
patterns -> roles), not as code paths. Experts stored fused in 3-D tensors
(``mlp.experts.gate_up_proj`` / ``down_proj``) are split into per-expert units that carry
the same names as a per-expert checkpoint (``mlp.experts.E.gate_proj.weight``), so a plan
reads the same whichever layout the checkpoint uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CheckpointError
from ..plan import FusedSource, Role, TieGroup
from .checkpoint import Checkpoint

# What the layer-by-layer model computes in; integer or fp8 weights would be silently cast to garbage.
WEIGHT_DTYPES = ("F16", "BF16", "F32")
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<layer>\d+)\.(?P<local>.+)$")

# local name inside a decoder block -> role, for 2-D linear weights
_LINEAR_ROLES: list[tuple[re.Pattern[str], Role]] = [
    (re.compile(rf"^{scope}\.{proj}_proj\.weight$"), Role(f"{family}_{proj}"))
    for scope, family, projs in [
        (r"self_attn", "attn", ("q", "k", "v", "o")),
        (r"mlp", "mlp", ("gate", "up", "down")),
        (r"mlp\.experts\.(?P<expert>\d+)", "expert", ("gate", "up", "down")),
        (r"mlp\.shared_experts?", "shared", ("gate", "up", "down")),
    ]
    for proj in projs
]
_ROUTER_RE = re.compile(r"^mlp\.(gate|shared_expert_gate)\.weight$")
_FUSED_RE = re.compile(r"^mlp\.experts\.(?P<which>gate_up_proj|down_proj)(?:\.weight)?$")
# Serving engines fuse these; one choice per group keeps the plan loadable there.
_TIES = {Role.attn_q: "qkv", Role.attn_k: "qkv", Role.attn_v: "qkv",
         Role.mlp_gate: "gate_up", Role.mlp_up: "gate_up",
         Role.expert_gate: "gate_up", Role.expert_up: "gate_up",
         Role.shared_gate: "gate_up", Role.shared_up: "gate_up"}


@dataclass(frozen=True)
class Unit:
    """One tensor of the checkpoint as the allocator sees it."""

    tensor: str
    module: str
    shape: tuple[int, ...]
    role: Role
    layer: Optional[int] = None
    expert: Optional[int] = None
    locked: bool = False
    reason: Optional[str] = None
    source: Optional[FusedSource] = None  # set when the data lives inside a fused 3-D tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local(self) -> str:
        """Name inside its decoder block (``self_attn.q_proj.weight``)."""
        m = _LAYER_RE.match(self.tensor)
        return m.group("local") if m else self.tensor


@dataclass
class Inventory:
    arch: str
    num_layers: int
    units: list[Unit]
    tie_groups: list[TieGroup] = field(default_factory=list)
    tied_embeddings: bool = False

    @property
    def quantized(self) -> list[Unit]:
        return [u for u in self.units if not u.locked]

    @property
    def counted_params(self) -> int:
        return sum(u.numel for u in self.quantized)


def build_inventory(ckpt: Checkpoint, include_lm_head: bool = False, include_embeddings: bool = False) -> Inventory:
    """List every tensor with its role and lock state; no weights are read."""
    cfg = ckpt.config
    tied = bool(cfg.get("tie_word_embeddings", False)) and "lm_head.weight" not in ckpt.tensors
    units: list[Unit] = []
    for name, info in ckpt.tensors.items():
        if info.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {info.file.name} is {info.dtype}; bitalloc reads float16, "
                                  "bfloat16 or float32 weights only: convert the checkpoint (or dequantize it) first")
        m = _LAYER_RE.match(name)
        if m:
            units.extend(_block_units(name, info.shape, m, cfg))
        else:
            units.append(_outer_unit(name, info.shape, tied, include_lm_head, include_embeddings))
    units.sort(key=_order)
    inv = Inventory(ckpt.arch, ckpt.num_layers, units, tied_embeddings=tied)
    inv.tie_groups = _tie_groups(inv.quantized)
    return inv


def _block_units(name: str, shape: tuple[int, ...], m: re.Match[str], cfg: dict) -> list[Unit]:
    layer, local = int(m.group("layer")), m.group("local")
    module = name.rsplit(".", 1)[0]
    if len(shape) == 1:
        role = Role.bias if local.endswith(".bias") else Role.norm
        return [Unit(name, module, shape, role, layer, locked=True, reason=role.value)]
    if _ROUTER_RE.match(local):
        return [Unit(name, module, shape, Role.router, layer, locked=True, reason="moe_router")]
    fused = _FUSED_RE.match(local)
    if fused and len(shape) == 3:
        return _split_fused(m.group("prefix"), layer, local, fused.group("which"), shape, cfg)
    for pattern, role in _LINEAR_ROLES:
        rm = pattern.match(local)
        if rm and len(shape) == 2:
            expert = int(rm.group("expert")) if "expert" in pattern.groupindex else None
            return [Unit(name, module, shape, role, layer, expert)]
    return [Unit(name, module, shape, Role.other, layer, locked=True, reason="unrecognized")]


def _split_fused(prefix: str, layer: int, local: str, which: str, shape: tuple[int, ...], cfg: dict) -> list[Unit]:
    """Per-expert units for a fused [E, out, in] (or transposed [E, in, out]) expert tensor."""
    key = f"{prefix}.{layer}.{local}"
    n_exp, a, b = shape
    hidden = int(cfg["hidden_size"])
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    base = f"{prefix}.{layer}.mlp.experts"
    units = []
    if which == "gate_up_proj":
        transposed = (a, b) == (hidden, 2 * inter)
        for e in range(n_exp):
            for part, role in (("gate", Role.expert_gate), ("up", Role.expert_up)):
                units.append(Unit(f"{base}.{e}.{part}_proj.weight", f"{base}.{e}.{part}_proj", (inter, hidden), role,
                                  layer, e, source=FusedSource(key=key, expert=e, part=part, transposed=transposed)))
    else:
        transposed = (a, b) == (inter, hidden) and inter != hidden
        for e in range(n_exp):
            units.append(Unit(f"{base}.{e}.down_proj.weight", f"{base}.{e}.down_proj", (hidden, inter),
                              Role.expert_down, layer, e,
                              source=FusedSource(key=key, expert=e, part="down", transposed=transposed)))
    return units


def _outer_unit(name: str, shape: tuple[int, ...], tied: bool, include_lm_head: bool, include_embeddings: bool) -> Unit:
    module = name.rsplit(".", 1)[0]
    if name.endswith("embed_tokens.weight"):
        # With tied embeddings this one tensor is also the output head; quantizing it is
        # asked for by either flag, since both uses read the same storage.
        wanted = include_embeddings or (tied and include_lm_head)
        reason = "embedding (tied with lm_head)" if tied else "embedding"
        return Unit(name, module, shape, Role.embedding, locked=not wanted, reason=None if wanted else reason)
    if name == "lm_head.weight":
        return Unit(name, module, shape, Role.lm_head, locked=not include_lm_head,
                    reason=None if include_lm_head else "lm_head")
    if len(shape) == 1:
        role = Role.bias if name.endswith(".bias") else Role.norm
        return Unit(name, module, shape, role, locked=True, reason=role.value)
    return Unit(name, module, shape, Role.other, locked=True, reason="outside decoder blocks")


def _order(u: Unit) -> tuple:
    outer = 0 if u.role == Role.embedding else 2
    return (1 if u.layer is not None else outer, u.layer or 0, -1 if u.expert is None else u.expert, u.tensor)


def _tie_groups(units: list[Unit]) -> list[TieGroup]:
    groups: dict[tuple, list[str]] = {}
    for u in units:
        kind = _TIES.get(u.role)
        if kind is None:
            continue
        groups.setdefault((kind, u.layer, u.expert, u.role.value.split("_")[0]), []).append(u.tensor)
    out = []
    for (kind, layer, expert, family), members in groups.items():
        if len(members) < 2:
            continue
        where = f"layers.{layer}" + (f".experts.{expert}" if expert is not None else "") + (
            ".shared" if family == "shared" else "")
        out.append(TieGroup(id=f"{where}.{kind}", kind=kind, members=sorted(members)))
    return out
