"""llama.cpp: GGUF tensor names, and ``llama-quantize --tensor-type-file`` with the exact command to run.

HF names are mapped to GGUF names as the model layer does (:mod:`bitalloc.model.gguf_names`, which also
serves the GGUF size prediction and the importance matrix). GGUF stores all experts of a layer and
projection in one 3-D tensor (``ffn_{gate,up,down}_exps``) with one type.

Plans made for llama.cpp (``--target llamacpp``, layout ``gguf``) name a ggml type per tensor, and the
solver already gave a layer's experts of one projection one type; the export writes those types as they
are. Older plans (layout compressed-tensors) are translated by bits, with per-expert widths aggregated to
the width covering most of that layer's expert parameters (ties: the wider), each change reported:

    2 -> Q2_K (2.625 bpw)   3 -> Q3_K (3.4375)   4 -> Q4_K (4.5)   5 -> Q5_K (5.5)
    6 -> Q6_K (6.5625)      8 -> Q8_0 (8.5)      locked -> F16 (16)

llama-quantize gives the output and token-embedding tensors the types of ``--output-tensor-type`` and
``--token-embedding-type`` before it reads any pattern, and every other tensor the type of the first
``--tensor-type`` pattern found in it (``std::regex_search`` on the lower-cased GGUF name), so each line of
the file is one anchored, escaped name.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..errors import PlanError
from ..model.gguf_names import gguf_name, tensor_name_map
from ..plan import GGML_TYPES, GGUF_LAYOUT, Entry, Plan, Role
from .rules import quantized_entries

TOOL = "llama.cpp"
BITS_TO_GGML = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}  # compressed-tensors plans
_BPW = {t: GGML_TYPES[t].bits_per_weight for t in (*BITS_TO_GGML.values(), "F16")}
INPUT_GGUF, OUTPUT_GGUF = "model-f16.gguf", "model-mixed.gguf"  # placeholders unless the user names the files


@dataclass
class LlamaCppExport:
    lines: list[str]  # REGEX=TYPE entries of the tensor-type file
    output_type: str
    embedding_type: str
    base_type: str  # llama-quantize's positional type: the type covering the most parameters (general.file_type)
    predicted_bytes: int
    changes: list[str] = field(default_factory=list)  # what the expert aggregation changed (older plans)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def command(self, tensor_type_file: str, input_gguf: str = INPUT_GGUF, output_gguf: str = OUTPUT_GGUF,
                imatrix: Optional[str] = None) -> str:
        """The llama-quantize command line that writes this plan's GGUF."""
        im = f"--imatrix {imatrix} " if imatrix else ""
        return (f"llama-quantize {im}--tensor-type-file {tensor_type_file} --output-tensor-type {self.output_type} "
                f"--token-embedding-type {self.embedding_type} {input_gguf} {output_gguf} {self.base_type}")


def export(plan: Plan) -> LlamaCppExport:
    entries = quantized_entries(plan, TOOL)
    n_layers = 1 + max((e.layer for e in plan.entries if e.layer is not None), default=0)
    names = tensor_name_map(plan.model.arch, n_layers)
    by_gguf: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        gg = gguf_name(names, e.tensor)
        if gg is None:
            raise PlanError(f"{e.tensor} has no GGUF name for {plan.model.arch}")
        by_gguf[gg].append(e)
    if plan.layout == GGUF_LAYOUT:
        types, changes = _planned_types(by_gguf), []
    else:
        types, changes = _types_by_bits(by_gguf)
    numel = {gg: sum(e.numel for e in members) for gg, members in by_gguf.items()}
    outer = {e.role: e for e in plan.entries if e.role in (Role.embedding, Role.lm_head)}
    emb = outer.get(Role.embedding)
    head = outer.get(Role.lm_head) or emb  # tied: the embedding is also the output
    inner = {gg: t for gg, t in types.items() if by_gguf[gg][0].role not in (Role.embedding, Role.lm_head)}
    weight: Counter = Counter()
    for gg, t in inner.items():
        weight[t] += numel[gg]
    base = max(weight, key=lambda t: (weight[t], _BPW[t])) if weight else _type_of(head, types, names)
    lines = [f"^{re.escape(name)}$={t.lower()}" for name, t in sorted(inner.items())]
    if plan.budget.file_bytes is not None:
        size = plan.budget.file_bytes
    else:
        size = int(sum(numel[gg] * _BPW[t] / 8 for gg, t in types.items())
                   + sum(e.numel * _BPW["F16"] / 8 for e in plan.entries if e.locked))
    return LlamaCppExport(lines, _type_of(head, types, names).lower(), _type_of(emb, types, names).lower(), base,
                          size, changes)


def _planned_types(by_gguf: dict[str, list[Entry]]) -> dict[str, str]:
    """A gguf plan's own types; the members of one GGUF tensor must agree (the solver ties them)."""
    out = {}
    for gg, members in by_gguf.items():
        kinds = {e.ggml for e in members}
        if len(kinds) > 1:
            raise PlanError(f"{gg} holds {len(members)} tensors of the plan with different types "
                            f"({', '.join(sorted(map(str, kinds)))}); GGUF stores them as one tensor of one type: "
                            "make the plan again with `allocate --target llamacpp`")
        out[gg] = members[0].ggml
    return out


def _types_by_bits(by_gguf: dict[str, list[Entry]]) -> tuple[dict[str, str], list[str]]:
    """An older plan's widths as ggml types; experts of one GGUF tensor aggregated by parameters, changes listed."""
    odd = sorted({e.bits for members in by_gguf.values() for e in members if e.bits not in BITS_TO_GGML})
    if odd:
        raise PlanError(f"llama.cpp has no {', '.join(map(str, odd))}-bit type; make the plan with --target llamacpp "
                        f"(or --candidates among {','.join(str(b) for b in BITS_TO_GGML)})")
    out, changes = {}, []
    for gg, members in sorted(by_gguf.items()):
        weight: Counter = Counter()
        for e in members:
            weight[e.bits] += e.numel
        bits = max(weight, key=lambda b: (weight[b], b))
        moved = [e for e in members if e.bits != bits]
        if moved:
            changes.append(f"{gg.removesuffix('.weight')}: {len(moved)} of {len(members)} experts moved to {bits} bits "
                           f"(from {sorted({e.bits for e in moved})})")
        out[gg] = BITS_TO_GGML[bits]
    return out, changes


def _type_of(e: Optional[Entry], types: dict[str, str], names) -> str:
    return "F16" if e is None or e.locked else types[gguf_name(names, e.tensor)]
