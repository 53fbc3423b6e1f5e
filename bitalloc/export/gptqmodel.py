"""GPTQModel ``QuantizeConfig`` with ``dynamic`` per-module overrides (also read by vLLM / SGLang).

GPTQModel matches each rule with ``re.match`` on the full module name, negative rules
(``-:``) first, then the first positive rule wins; vLLM walks the dict in order the same way, but
with its fused module names (``qkv_proj``, ``gate_up_proj``), which the tie-group rules also match.
Per-expert widths are honoured by GPTQModel; vLLM's fused MoE layers take one width per layer.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import PlanError
from ..plan import Candidate, Plan
from .rules import base_choice, check_fusable, compile_rules, imported_choice, locked_linear_modules

TOOL = "GPTQModel dynamic"


def export(plan: Plan) -> dict[str, Any]:
    check_fusable(plan, TOOL)
    base = base_choice(plan, TOOL)
    dynamic: dict[str, dict] = {}
    for module in locked_linear_modules(plan):
        dynamic[f"-:^{re.escape(module)}$"] = {}
    for rule in compile_rules(plan, TOOL, skip=base):
        dynamic[rule.pattern] = {"bits": rule.choice.bits, "group_size": rule.choice.group_size,
                                 "sym": rule.choice.symmetric}
    return {"bits": base.bits, "group_size": base.group_size, "sym": base.symmetric, "desc_act": False,
            "lm_head": any(e.role.value == "lm_head" and not e.locked for e in plan.entries),
            "quant_method": "gptq", "checkpoint_format": "gptq", "dynamic": dynamic}


def resolve(config: dict[str, Any], module: str, in_features: int) -> Candidate | None:
    """The choice GPTQModel gives ``module`` under ``config``: None when excluded by a ``-:`` rule.

    ``group_size`` -1 is GPTQModel's per-channel setting: one group spanning the ``in_features`` inputs."""
    try:
        rules = dict(config.get("dynamic") or {})
        bits = config["bits"]
    except (KeyError, TypeError, ValueError):
        raise PlanError("not a GPTQModel quantize_config (needs bits, group_size and an optional dynamic)") from None
    if not all(isinstance(v, dict) for v in rules.values()):
        raise PlanError("not a GPTQModel quantize_config: every dynamic rule maps a pattern to an object")
    base = imported_choice(bits, config.get("group_size", 128), config.get("sym", True), in_features,
                           "GPTQModel quantize_config")
    negatives = [p for p in rules if p.startswith("-:")]
    for p in negatives:
        if _matches(p[2:], module):
            return None
    for p, override in rules.items():
        if p in negatives:
            continue
        if _matches(p.removeprefix("+:"), module):
            return imported_choice(override.get("bits", base.bits), override.get("group_size", base.group_size),
                                   override.get("sym", base.symmetric), in_features, f"dynamic rule {p!r}")
    return base


def _matches(pattern: str, module: str) -> bool:
    """GPTQModel's ``re.match``; a pattern Python cannot compile is the config's error, not a crash."""
    try:
        return re.match(pattern, module) is not None
    except re.error as exc:
        raise PlanError(f"dynamic rule {pattern!r} is an invalid regular expression: {exc}") from None
