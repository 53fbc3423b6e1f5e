"""compressed-tensors ``quantization_config`` (vLLM's native format) and the llm-compressor recipe.

One config group per distinct scheme, with ``re:`` targets; locked linears (router, lm_head) in
``ignore``; top-level ``format`` ``mixed-precision`` when schemes differ. Packing: compressed-tensors
packs int weights of 4 and 8 bits (``pack-quantized``); 2- and 3-bit groups are written
``naive-quantized``. vLLM's fast WNA16 path serves 4 and 8 bit only, so other widths are warned about.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import PlanError
from ..plan import Candidate, Plan
from .rules import check_fusable, compile_rules, imported_choice, locked_linear_modules

TOOL = "compressed-tensors"
PACKED_BITS = (4, 8)  # compressed-tensors' pack-quantized int widths; also vLLM's WNA16 fast path


def _args(c: Candidate) -> dict[str, Any]:
    return {"num_bits": c.bits, "type": "int", "symmetric": c.symmetric, "strategy": "group",
            "group_size": c.group_size, "dynamic": False}


def export(plan: Plan) -> dict[str, Any]:
    check_fusable(plan, TOOL)
    rules = compile_rules(plan, TOOL)
    by_choice: dict[Candidate, list[str]] = {}
    for r in rules:
        by_choice.setdefault(r.choice, []).append("re:" + r.pattern)
    slow = sorted({c.bits for c in by_choice if c.bits not in PACKED_BITS})
    if slow:
        warnings.warn(f"{TOOL}: {', '.join(map(str, slow))}-bit groups are stored naive-quantized and are not on "
                      "vLLM's fast path (it serves 4 and 8 bit); consider the GPTQModel export for serving",
                      stacklevel=2)
    groups = {}
    for c, targets in sorted(by_choice.items(), key=lambda kv: (kv[0].bits, kv[0].group_size)):
        groups[f"group_{c.id}"] = {"targets": targets, "weights": _args(c), "input_activations": None,
                                   "output_activations": None,
                                   "format": "pack-quantized" if c.bits in PACKED_BITS else "naive-quantized"}
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": [f"re:^{m.replace('.', chr(92) + '.')}$" for m in locked_linear_modules(plan)]}


def recipe(plan: Plan) -> str:
    """The llm-compressor recipe (YAML) that produces the same checkpoint with GPTQ."""
    import yaml

    cfg = export(plan)
    groups = {name: {"targets": g["targets"], "weights": g["weights"]} for name, g in cfg["config_groups"].items()}
    return yaml.safe_dump({"quant_stage": {"quant_modifiers": {"GPTQModifier": {
        "ignore": cfg["ignore"], "config_groups": groups}}}}, sort_keys=False)


def validate(config: dict[str, Any], plan: Plan) -> None:
    """Parse with compressed-tensors' own classes and check each module matches exactly its group."""
    try:
        import torch
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import is_match
    except ImportError:
        raise PlanError("validating a compressed-tensors export needs the compressed-tensors package") from None
    try:
        parsed = QuantizationConfig.model_validate(config)
    except ValueError as exc:  # pydantic's ValidationError
        raise PlanError(f"not a valid compressed-tensors config: {str(exc).splitlines()[0][:160]}") from None
    linear = torch.nn.Linear(1, 1, device="meta")
    for e in plan.entries:
        ignored = is_match(e.module, linear, parsed.ignore or [])
        hits = [name for name, g in parsed.config_groups.items() if is_match(e.module, linear, g.targets)]
        if e.locked:
            if e.role.value in ("router", "lm_head") and not ignored:
                raise PlanError(f"{e.module} is locked but not ignored")
            if hits and not ignored:
                raise PlanError(f"{e.module} is locked but matched by {hits}")
            continue
        if ignored or len(hits) != 1:
            raise PlanError(f"{e.module} matches {len(hits)} config groups (ignored={ignored}); expected exactly one")
        w = parsed.config_groups[hits[0]].weights
        if (w.num_bits, w.group_size) != (e.bits, e.group_size):
            raise PlanError(f"{e.module}: group {hits[0]} gives {w.num_bits} bits g{w.group_size}, plan {e.bits}")


def resolve(config: dict[str, Any], module: str, in_features: int) -> Candidate | None:
    """The choice ``config`` gives ``module``: integer weights by group or by channel (one group per row)."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    try:
        parsed = QuantizationConfig.model_validate(config)
    except ValueError as exc:  # pydantic's ValidationError
        raise PlanError(f"not a valid compressed-tensors config: {str(exc).splitlines()[0][:160]}") from None
    linear = torch.nn.Linear(1, 1, device="meta")
    if is_match(module, linear, parsed.ignore or []):
        return None
    for name, g in parsed.config_groups.items():
        if is_match(module, linear, g.targets):
            w = g.weights
            if w is None:
                return None
            strategy = str(getattr(w.strategy, "value", w.strategy))
            if str(getattr(w.type, "value", w.type)) != "int" or strategy not in ("group", "channel"):
                raise PlanError(f"config group {name}: {w.type} weights with strategy {strategy} cannot be priced as "
                                "integer codes with per-group scales; bitalloc imports int group/channel schemes")
            group = w.group_size if strategy == "group" and w.group_size else in_features
            return imported_choice(w.num_bits, group, w.symmetric, in_features, f"config group {name}")
    return None
