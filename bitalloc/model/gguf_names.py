"""GGUF tensor names of checkpoint tensors, from the ``gguf`` package's HF -> GGUF tensor-name map.

The name a tensor gets in a GGUF file is a fact of the checkpoint format that several stages need: the
GGUF size prediction (:mod:`.gguf`), the importance-matrix writer and the llama.cpp export (its
``--tensor-type-file`` names GGUF tensors). It lives in the model layer, first in the data flow, and
imports only the errors, so that the exporters, which read plans only, may use it too. GGUF stores all
experts of a layer and projection in one 3-D tensor (``ffn_{gate,up,down}_exps``).
"""

from __future__ import annotations

import re
from typing import Optional

from ..errors import PlanError

GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}
_EXPERT = re.compile(r"^(?P<base>.+\.mlp\.experts)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)(?:\.weight)?$")


def tensor_name_map(arch: str, n_layers: int):
    """The ``gguf`` package's HF -> GGUF tensor-name map for a bitalloc architecture name."""
    import gguf

    if arch not in GGUF_ARCHS:
        raise PlanError(f"no GGUF architecture mapping for {arch}; llama.cpp targets: {', '.join(GGUF_ARCHS)}")
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCHS[arch]), n_layers)


def gguf_arch_name(arch: str) -> str:
    """The architecture string GGUF files record (``general.architecture``)."""
    import gguf

    tensor_name_map(arch, 1)  # refuses unknown architectures
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, GGUF_ARCHS[arch])]


def gguf_name(names, tensor: str) -> Optional[str]:
    """The GGUF tensor that stores the checkpoint tensor ``tensor`` (every expert of a layer and projection
    maps to the one fused ``..._exps.weight``); None when the map has no name for it."""
    m = _EXPERT.match(tensor)
    key = f"{m.group('base')}.{m.group('proj')}" if m else tensor
    gg = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gg is None:
        return None
    if not gg.endswith((".weight", ".bias")):
        gg += ".bias" if tensor.endswith(".bias") else ".weight"
    return gg
