"""Exporters and importers: plans to and from the configs other quantizers read.

``export_plan(plan, fmt)`` returns the file text for one format; ``import_config(path, model)``
reads a GPTQModel, compressed-tensors or AutoRound config back into a plan, so existing
quantizations can be compared (``bitalloc diff``). Each exporter refuses, with a one-line reason,
what its target cannot express (column segments, tie groups split by the plan).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable

from ..errors import PlanError
from ..plan import Plan
from . import autoround, compressed_tensors, gptqmodel, llamacpp, torchao

FORMATS = ("gptqmodel", "compressed-tensors", "llmcompressor-recipe", "llamacpp", "autoround", "torchao")


def export_plan(plan: Plan, fmt: str) -> tuple[str, list[str]]:
    """(file text, notes for the user) for ``fmt``."""
    notes: list[str] = []
    if fmt == "gptqmodel":
        return _json(gptqmodel.export(plan)), notes
    if fmt == "compressed-tensors":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = compressed_tensors.export(plan)
        compressed_tensors.validate(cfg, plan)
        return _json({"quantization_config": cfg}), [str(w.message) for w in caught]
    if fmt == "llmcompressor-recipe":
        return compressed_tensors.recipe(plan), notes
    if fmt == "llamacpp":
        out = llamacpp.export(plan)
        notes = out.changes + [f"predicted GGUF size {out.predicted_bytes / 1e6:.2f} MB",
                               "run: " + out.command("<this file>")]
        return out.text, notes
    if fmt == "autoround":
        return _json(autoround.export(plan)), notes
    if fmt == "torchao":
        return _json(torchao.export(plan)), notes
    raise PlanError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


def detect(config: Any) -> tuple[str, dict, Callable]:
    """(format name, the config itself, its resolver) for a loaded JSON document."""
    if not isinstance(config, dict):
        raise PlanError("not a quantization config (expected a JSON object)")
    if isinstance(config.get("quantization_config"), dict):
        config = config["quantization_config"]
    if "config_groups" in config:
        return "compressed-tensors", config, compressed_tensors.resolve
    if "bits" in config and not isinstance(config["bits"], dict):
        return "gptqmodel", config, gptqmodel.resolve
    if config and all(isinstance(v, dict) and "bits" in v for v in config.values()):
        return "autoround", config, autoround.resolve
    raise PlanError("unrecognised config: expected a GPTQModel quantize_config, a compressed-tensors "
                    "quantization_config or an AutoRound layer_config")
