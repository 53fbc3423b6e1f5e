"""Exporters and importers: plans to and from the configs other quantizers read.

``export_plan(plan, fmt)`` returns the file text for one format, through the :data:`EXPORTERS`
registry; ``bitalloc.api.importer.import_config(path, model)`` reads a GPTQModel, compressed-tensors or AutoRound config back into a plan, so existing
quantizations can be compared (``bitalloc diff``). Each exporter refuses, with a one-line reason,
what its target cannot express (column segments, tie groups split by the plan).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Optional

from ..errors import PlanError
from ..plan import Candidate, Plan
from . import autoround, compressed_tensors, gptqmodel, llamacpp, torchao


def _gptqmodel(plan: Plan) -> Exported:
    return _json(gptqmodel.export(plan)), []


def _compressed_tensors(plan: Plan) -> Exported:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = compressed_tensors.export(plan)
    compressed_tensors.validate(cfg, plan)
    return _json({"quantization_config": cfg}), [str(w.message) for w in caught]


def _llmcompressor_recipe(plan: Plan) -> Exported:
    return compressed_tensors.recipe(plan), []


def _llamacpp(plan: Plan) -> Exported:
    out = llamacpp.export(plan)
    return out.text, out.changes + [f"predicted GGUF size {out.predicted_bytes / 1e6:.3f} MB"]


def _autoround(plan: Plan) -> Exported:
    return _json(autoround.export(plan)), []


def _torchao(plan: Plan) -> Exported:
    return _json(torchao.export(plan)), []


Exported = tuple[str, list[str]]  # (file text, notes for the user)
EXPORTERS: dict[str, Callable[[Plan], Exported]] = {
    "gptqmodel": _gptqmodel, "compressed-tensors": _compressed_tensors, "llmcompressor-recipe": _llmcompressor_recipe,
    "llamacpp": _llamacpp, "autoround": _autoround, "torchao": _torchao,
}
FORMATS = tuple(EXPORTERS)


def export_plan(plan: Plan, fmt: str) -> Exported:
    """(file text, notes for the user) for ``fmt``, one of :data:`FORMATS`."""
    exporter = EXPORTERS.get(fmt)
    if exporter is None:
        raise PlanError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if plan.decomposition is not None:
        raise PlanError(f"{fmt} cannot express this plan: it stores MoE experts as a shared spectral basis plus "
                        f"quantized factors ({plan.decomposition.method} decomposition section), which {fmt} has no "
                        "format for; export a per-tensor plan (allocate without --method bitsmoe)")
    return exporter(plan)


def llamacpp_command(plan: Plan, tensor_type_file: str, input_gguf: Optional[str] = None,
                     output_gguf: Optional[str] = None, imatrix: Optional[str] = None) -> str:
    """The exact ``llama-quantize`` command that applies ``plan`` with the tensor-type file written by
    ``export_plan(plan, "llamacpp")`` (input and output GGUF placeholders unless given)."""
    return llamacpp.export(plan).command(tensor_type_file, input_gguf or llamacpp.INPUT_GGUF,
                                         output_gguf or llamacpp.OUTPUT_GGUF, imatrix)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


def detect(config: Any) -> tuple[str, dict, Resolver]:
    """(format name, the config itself, its resolver) for a loaded JSON document.

    A resolver maps (config, module name, the module's input width) to the module's choice, or None
    when the config leaves it unquantized; per-channel scales become a group of the whole input width.
    """
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


Resolver = Callable[[dict, str, int], Optional[Candidate]]
