"""Shared by the exporters: per-module choices of a plan, and compact anchored regex rules.

Plans store exact tensor names; exporters compile them into the patterns each tool matches
module names with. A rule covers one module template (the name with the layer index taken
out) and the set of layers that share a choice, as an alternation of exact indices
(``layers\\.(0|3|7)\\.``), which can never match a layer outside the set. Tensors tied
together (q/k/v, gate/up) get one rule that also matches the fused name serving engines use
(``qkv_proj``, ``gate_up_proj``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from ..errors import PlanError
from ..plan import Candidate, Entry, Plan, Role

_LAYER = re.compile(r"^(?P<pre>.*?layers)\.(?P<layer>\d+)\.(?P<post>.+)$")
# tied projections and the fused module name serving engines load them as
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj"), "gate_up": ("gate_proj", "up_proj", "gate_up_proj")}
LINEAR_LOCKED = (Role.router, Role.lm_head)  # locked modules that are linear layers a quantizer would touch


@dataclass(frozen=True)
class Rule:
    pattern: str  # anchored regex over module names
    choice: Candidate
    modules: tuple[str, ...]  # the plan's module names it covers


def quantized_entries(plan: Plan, tool: str) -> list[Entry]:
    segmented = [e.tensor for e in plan.entries if e.segments]
    if segmented:
        raise PlanError(f"{tool} sets one width per module; this plan splits {segmented[0]} into column segments "
                        "(--granularity slab). Re-plan with --granularity tensor for this export.")
    return [e for e in plan.entries if not e.locked and not e.decomposed]  # decomposed: stored as factors, no module


def check_fusable(plan: Plan, tool: str) -> None:
    """Serving engines load q/k/v and gate/up as one fused module with one scheme: refuse plans that split them."""
    choices = {e.module: e.candidate for e in plan.entries if not e.locked and not e.decomposed}
    sets: dict[tuple[str, str], set] = defaultdict(set)
    for module, c in choices.items():
        parent, _, leaf = module.rpartition(".")
        for kind, names in _FUSED.items():
            if leaf in names:
                sets[(parent, kind)].add(c)
    for (parent, kind), cs in sets.items():
        if len(cs) > 1:
            raise PlanError(f"{tool}: {parent} {kind} projections have different widths "
                            f"({', '.join(sorted(c.id for c in cs))}); serving engines fuse them into one module")


def module_choices(plan: Plan, tool: str) -> dict[str, Candidate]:
    return {e.module: e.candidate for e in quantized_entries(plan, tool)}


def base_choice(plan: Plan, tool: str) -> Candidate:
    """The choice covering the most parameters: the config's default, so the rules list only exceptions."""
    weight: Counter = Counter()
    for e in quantized_entries(plan, tool):
        weight[e.candidate] += e.numel
    if not weight:
        raise PlanError("the plan quantizes no tensor")
    return max(weight, key=lambda c: (weight[c], c.bits))


def locked_linear_modules(plan: Plan) -> list[str]:
    return [e.module for e in plan.entries if e.locked and e.role in LINEAR_LOCKED]


def compile_rules(plan: Plan, tool: str, skip: Optional[Candidate] = None) -> list[Rule]:
    """Anchored rules giving every quantized module its choice (modules at ``skip`` are left to the default)."""
    choices = module_choices(plan, tool)
    tie_of: dict[str, str] = {}
    for g in plan.tie_groups:
        for m in g.members:
            tie_of[m.removesuffix(".weight")] = g.kind
    groups: dict[tuple[str, Candidate], list[tuple[Optional[int], str]]] = defaultdict(list)
    for module, choice in choices.items():
        if choice == skip:
            continue
        template, layer = _template(module, tie_of.get(module))
        groups[(template, choice)].append((layer, module))
    rules = []
    for (template, choice), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1].bits)):
        layers = sorted({layer for layer, _ in members if layer is not None})
        alternation = layers[0] if len(layers) == 1 else f"({'|'.join(str(x) for x in layers)})"
        pattern = template.replace("<L>", str(alternation))
        rules.append(Rule(pattern, choice, tuple(sorted(m for _, m in members))))
    _check_disjoint(rules, choices)
    return rules


def _template(module: str, tie_kind: Optional[str]) -> tuple[str, Optional[int]]:
    m = _LAYER.match(module)
    if not m:
        return f"^{re.escape(module)}$", None
    post = re.escape(m.group("post"))
    if tie_kind in _FUSED:
        leaf = m.group("post").rsplit(".", 1)[-1]
        if leaf in _FUSED[tie_kind]:
            parent = m.group("post").rsplit(".", 1)[0]
            names = "|".join(n.removesuffix("_proj") for n in _FUSED[tie_kind])
            post = f"{re.escape(parent)}\\.({names})_proj"
    return f"^{re.escape(m.group('pre'))}\\.<L>\\.{post}$", int(m.group("layer"))


def _check_disjoint(rules: list[Rule], choices: dict[str, Candidate]) -> None:
    """Every module must match exactly the rule that carries its choice (the compiler's own contract)."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    for module, choice in choices.items():
        hits = [r for p, r in compiled if p.match(module)]
        if len(hits) > 1 or (hits and hits[0].choice != choice):
            raise PlanError(f"cannot express {module} unambiguously: rules {[r.pattern for r in hits]}; "
                            "a tie group whose members got different widths?")


def imported_choice(bits: object, group: object, symmetric: object, in_features: int, where: str) -> Candidate:
    """A config's (bits, group, sym) as a Candidate; a value bitalloc cannot price is refused naming ``where``."""
    try:
        return Candidate(bits=int(bits), group_size=group_of(group, in_features), symmetric=bool(symmetric))
    except (TypeError, ValueError, OverflowError):  # pydantic's ValidationError is a ValueError
        raise PlanError(f"{where}: bits={bits!r} group_size={group!r} cannot be imported; bits must be 1 to 8 and "
                        "group_size a positive integer (-1: per channel)") from None


def group_of(value: object, in_features: int) -> int:
    """A config's group size for a module: -1 or null is per channel, one group over all ``in_features`` inputs."""
    if value is None or int(value) == -1:
        return in_features
    return int(value)
