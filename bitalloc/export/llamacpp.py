"""llama.cpp ``llama-quantize --tensor-type-file`` with GGUF tensor names and ggml types.

HF names are mapped with the ``gguf`` package's tensor-name map. GGUF stores all experts of a
layer in one 3-D tensor (``ffn_{gate,up,down}_exps``) with one type, so per-expert widths are
aggregated to the width covering most of that layer's expert parameters (ties: the wider); the
exporter reports each change. Bits map to ggml types by bits per weight:

    2 -> Q2_K (2.625 bpw)   3 -> Q3_K (3.4375)   4 -> Q4_K (4.5)   5 -> Q5_K (5.5)
    6 -> Q6_K (6.5625)      8 -> Q8_0 (8.5)      locked -> F16 (16)

K-quants need rows divisible by 256; llama.cpp falls back for other shapes, which the predicted
size ignores.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..errors import PlanError
from ..plan import Entry, Plan, Role
from .rules import quantized_entries

TOOL = "llama.cpp"
GGML_TYPES = {2: ("q2_k", 2.625), 3: ("q3_k", 3.4375), 4: ("q4_k", 4.5), 5: ("q5_k", 5.5), 6: ("q6_k", 6.5625),
              8: ("q8_0", 8.5)}
F16 = ("f16", 16.0)
_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}
_EXPERT = re.compile(r"^(?P<base>.+\.mlp\.experts)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)$")


@dataclass
class LlamaCppExport:
    lines: list[str]  # REGEX=TYPE entries of the tensor-type file
    output_type: str
    embedding_type: str
    predicted_bytes: int
    changes: list[str] = field(default_factory=list)  # what the expert aggregation changed

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def command(self, tensor_type_file: str) -> str:
        return (f"llama-quantize --tensor-type-file {tensor_type_file} --output-tensor-type {self.output_type} "
                f"--token-embedding-type {self.embedding_type} model-f16.gguf model-mixed.gguf q4_k_m")


def _name_map(plan: Plan, n_layers: int):
    import gguf

    arch = _ARCHS.get(plan.model.arch)
    if arch is None:
        raise PlanError(f"no GGUF architecture mapping for {plan.model.arch}")
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)


def _check_widths(entries: list[Entry]) -> None:
    """Refuse widths with no ggml type (1 and 7 bits) rather than silently round them to another size."""
    odd = [e for e in entries if e.bits not in GGML_TYPES]
    if odd:
        widths = ", ".join(str(b) for b in sorted({e.bits for e in odd}))
        raise PlanError(f"llama.cpp has no {widths}-bit type ({odd[0].tensor} and {len(odd) - 1} more); make the "
                        f"plan with --candidates among {','.join(str(b) for b in GGML_TYPES)}")


def export(plan: Plan) -> LlamaCppExport:
    entries = quantized_entries(plan, TOOL)
    _check_widths(entries)
    n_layers = 1 + max((e.layer for e in plan.entries if e.layer is not None), default=0)
    names = _name_map(plan, n_layers)
    types: dict[str, tuple[str, float]] = {}
    numel: Counter = Counter()
    experts: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        m = _EXPERT.match(e.module)
        if m:
            experts[f"{m.group('base')}.{m.group('proj')}"].append(e)
            continue
        gg = names.get_name(e.tensor, try_suffixes=(".weight",))
        if gg is None:
            raise PlanError(f"{e.tensor} has no GGUF name for {plan.model.arch}")
        types[gg] = GGML_TYPES[e.bits]
        numel[gg] += e.numel
    changes = []
    for fused, members in sorted(experts.items()):
        weight: Counter = Counter()
        for e in members:
            weight[e.bits] += e.numel
        bits = max(weight, key=lambda b: (weight[b], b))
        moved = [e for e in members if e.bits != bits]
        gg = names.get_name(fused, try_suffixes=(".weight",))
        if gg is None:
            raise PlanError(f"{fused} has no GGUF name for {plan.model.arch}")
        if moved:
            changes.append(f"{gg}: {len(moved)} of {len(members)} experts moved to {bits} bits "
                           f"(from {sorted({e.bits for e in moved})})")
        types[gg + ".weight" if not gg.endswith(".weight") else gg] = GGML_TYPES[bits]
        numel[gg + ".weight" if not gg.endswith(".weight") else gg] += sum(e.numel for e in members)
    lines = [f"^{re.escape(name)}$={t}" for name, (t, _) in sorted(types.items())]
    size = sum(numel[n] * bpw / 8 for n, (_, bpw) in types.items())
    size += sum(e.numel * F16[1] / 8 for e in plan.entries if e.locked)
    by_role = {e.role: e for e in plan.entries if e.role in (Role.embedding, Role.lm_head)}
    emb = by_role.get(Role.embedding)
    head = by_role.get(Role.lm_head) or emb
    return LlamaCppExport(lines, _type_of(head), _type_of(emb), int(size), changes)


def _type_of(e: Entry | None) -> str:
    return F16[0] if e is None or e.locked else GGML_TYPES[e.bits][0]
