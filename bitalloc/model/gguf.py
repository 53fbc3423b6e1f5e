"""The GGUF file that llama.cpp's converter and llama-quantize make of a checkpoint: its tensors and its size.

A byte budget for llama.cpp is the size of the file llama-quantize writes, and only part of that file is
quantized weights: the header and key-values (hyper-parameters, the whole tokenizer: every token string,
its type, every BPE merge), one info record per tensor, the tensors llama-quantize keeps as they are (norms
and routers in F32, locked tensors in F16), and padding to ``GGUF_ALIGNMENT`` before the data and after every
tensor. This module predicts each part from the checkpoint alone (config.json, tokenizer files), as
``convert_hf_to_gguf.py --outtype f16`` lays the file out, so that a plan can be solved for a file size
before any GGUF exists.

What is estimated rather than counted: the few short strings the converter derives from the directory
name (``general.name``, ``basename``, ``size_label``) and the pre-tokenizer's name; together a few dozen
bytes. Tensors the converter adds that the checkpoint does not hold (``rope_freqs`` of Llama-3 rope
scaling) are not counted. Budgets keep :attr:`GgufLayout.slack_bytes` free for the worst case of the
per-tensor padding and for the key-values llama-quantize adds (``quantize.imatrix.*``), so a plan's file
never exceeds its budget; the plan reports the predicted size itself.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ..budget import GGML_TYPES, Budget
from ..errors import BudgetError, CheckpointError
from .checkpoint import Checkpoint
from .gguf_names import gguf_arch_name, gguf_name, tensor_name_map
from .inventory import Inventory

GGUF_ALIGNMENT = 32  # gguf's default general.alignment: tensor data starts and ends on this boundary
# what llama-quantize --imatrix adds: quantize.imatrix.{file,dataset} (strings: the paths, up to this
# long each) and quantize.imatrix.{entries,chunks}_count
_QUANTIZE_STRING_ALLOWANCE = 512
_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, key-value count
_SPECIAL_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # gguf.SpecialVocab's types
_ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # kept in F32 by the converter and llama-quantize


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file and the checkpoint tensors stored in it."""

    name: str
    n_dims: int
    units: tuple[str, ...]  # a layer's experts of one projection share one 3-D tensor
    numel: int
    fixed_type: Optional[str]  # F32 / F16 when llama-quantize keeps the tensor; None when the plan sets its type


def _pad(n: int) -> int:
    return -(-n // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


@dataclass(frozen=True)
class GgufLayout:
    tensors: tuple[GgufTensor, ...]
    metadata_bytes: int  # header, key-values (tokenizer included) and tensor infos, padded to the alignment

    @property
    def n_elements(self) -> int:
        """Every weight of the file: what llama.cpp divides by for its bits-per-weight figure."""
        return sum(t.numel for t in self.tensors)

    def _fixed(self) -> list[tuple[GgufTensor, int]]:
        return [(t, t.numel * GGML_TYPES[t.fixed_type].type_size) for t in self.tensors if t.fixed_type]

    @property
    def fixed_bytes(self) -> int:
        """Metadata plus the tensors llama-quantize keeps, padding included: the part no plan changes."""
        return self.metadata_bytes + sum(_pad(n) for _, n in self._fixed())

    @property
    def slack_bytes(self) -> int:
        """Kept free under a byte budget: the most padding the planned tensors can need, and the key-values
        llama-quantize adds with an importance matrix."""
        planned = sum(t.fixed_type is None for t in self.tensors)
        quantize_kvs = sum(8 + len(k) + 4 for k in ("quantize.imatrix.file", "quantize.imatrix.dataset",
                                                    "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"))
        return planned * (GGUF_ALIGNMENT - 1) + quantize_kvs + 2 * (8 + _QUANTIZE_STRING_ALLOWANCE) + 2 * 4

    def planned_budget(self, budget: Budget) -> Budget:
        """``budget`` (a file size, or llama.cpp's bits per weight over every tensor) as the bytes left to the
        tensors the plan chooses types for."""
        if budget.unit == "bytes":
            left = math.floor(budget.value) - self.fixed_bytes - self.slack_bytes
            what = (f"the GGUF file's fixed part ({self.fixed_bytes / 1e6:.3f} MB: metadata and tokenizer, "
                    f"norms, tensors kept unquantized) and {self.slack_bytes} bytes of padding allowance")
        else:
            fixed_bits = 8 * sum(n for _, n in self._fixed())
            left = math.floor(budget.value * self.n_elements - fixed_bits) // 8
            what = f"the tensors kept unquantized ({fixed_bits / self.n_elements:.4f} bpw of the file's weights)"
        if left <= 0:
            raise BudgetError(f"budget {budget.text} does not even hold {what}; raise the budget")
        return Budget(float(left), "bytes", budget.text)

    def file_bytes(self, unit_bits: Mapping[str, int]) -> int:
        """The predicted file size when each planned checkpoint tensor takes ``unit_bits[name]`` bits."""
        planned = [_pad(sum(unit_bits[u] for u in t.units) // 8) for t in self.tensors if t.fixed_type is None]
        return self.fixed_bytes + sum(planned)

    def expert_groups(self) -> list[list[str]]:
        """Planned checkpoint tensors that share one GGUF tensor (a layer's experts of one projection)."""
        return [list(t.units) for t in self.tensors if t.fixed_type is None and len(t.units) > 1]


def gguf_layout(ckpt: Checkpoint, inv: Inventory) -> GgufLayout:
    """The GGUF layout of ``ckpt`` with ``inv``'s locked tensors kept and the others left to the plan."""
    names = tensor_name_map(inv.arch, inv.num_layers)
    groups: dict[str, list] = defaultdict(list)
    for u in inv.units:
        gg = gguf_name(names, u.tensor)
        if gg is None:
            raise CheckpointError(f"{u.tensor} has no GGUF tensor name for {inv.arch}; llama.cpp's converter would "
                                  "not write it as bitalloc expects")
        groups[gg].append(u)
    tensors = []
    for gg, units in groups.items():
        locked = {u.locked for u in units}
        if len(locked) > 1:
            raise CheckpointError(f"{gg} would hold both quantized and locked tensors ({units[0].tensor}); "
                                  "lock or include all of them")
        n_dims = len(units[0].shape) + (1 if len(units) > 1 else 0)
        fixed = None
        if locked == {True}:
            f32 = n_dims == 1 or gg.endswith(("_norm.weight", ".bias")) or gg.endswith(_ROUTERS)
            fixed = "F32" if f32 else "F16"
        tensors.append(GgufTensor(gg, n_dims, tuple(u.tensor for u in units), sum(u.numel for u in units), fixed))
    return GgufLayout(tuple(tensors), _pad(_HEADER + _key_values(ckpt) + sum(_tensor_info(t) for t in tensors)))


def _tensor_info(t: GgufTensor) -> int:
    return _string(t.name) + 4 + 8 * t.n_dims + 4 + 8  # name, n_dims, dims, type, offset


def _string(s: str) -> int:
    return 8 + len(s.encode())


def _kv(key: str, value_bytes: int) -> int:
    return _string(key) + 4 + value_bytes


def _array(key: str, items_bytes: int) -> int:
    return _kv(key, 4 + 8 + items_bytes)  # item type, count, items


def _key_values(ckpt: Checkpoint) -> int:
    """Bytes of the key-value section the converter writes: general.*, hyper-parameters, tokenizer."""
    cfg = ckpt.config
    arch = gguf_arch_name(ckpt.arch)
    label = ckpt.path.resolve().name
    total = _kv("general.architecture", _string(arch)) + _kv("general.type", _string("model"))
    total += _kv("general.name", _string(label)) + _kv("general.basename", _string(label))
    total += _kv("general.size_label", _string("000.0M"))
    total += sum(_kv(k, 4) for k in ("general.file_type", "general.quantization_version"))
    hparams = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon",
               "attention.key_length", "attention.value_length", "vocab_size", "rope.dimension_count"]
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        hparams += ["expert_count", "expert_used_count", "expert_feed_forward_length"]
    total += sum(_kv(f"{arch}.{k}", 4) for k in hparams)
    return total + _tokenizer_key_values(ckpt.path, cfg)


def _tokenizer_key_values(path: Path, cfg: dict) -> int:
    """tokenizer.ggml.*: model, pre, tokens (padded to the config's vocab_size), types, scores (SentencePiece),
    merges (BPE), special token ids and flags, chat template."""
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json; bitalloc predicts the GGUF's tokenizer metadata from it "
                              "(save the tokenizer with the model, as convert_hf_to_gguf.py needs it too)")
    try:
        tok = json.loads(tj.read_text())
        model = tok["model"]
        vocab = model["vocab"]
        ids = {int(i): str(t) for t, i in vocab.items()} if isinstance(vocab, dict) else \
            {i: str(v[0]) for i, v in enumerate(vocab)}
        ids.update({int(a["id"]): str(a["content"]) for a in tok.get("added_tokens", [])})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{tj} is not a tokenizer.json bitalloc can read") from None
    n_vocab = int(cfg.get("vocab_size") or (max(ids) + 1))
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    spm = (path / "tokenizer.model").is_file()
    total = _kv("tokenizer.ggml.model", _string("llama" if spm else "gpt2"))
    total += _kv("tokenizer.ggml.pre", _string("default" if spm else "0123456789abcdef"))
    total += _array("tokenizer.ggml.tokens", sum(_string(t) for t in tokens))
    total += _array("tokenizer.ggml.token_type", 4 * n_vocab)
    if spm:
        total += _array("tokenizer.ggml.scores", 4 * n_vocab)
    if merges:
        total += _array("tokenizer.ggml.merges", sum(_string(m) for m in merges))
    tc_path = path / "tokenizer_config.json"
    try:
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{tc_path} is not valid JSON") from None
    special = [t for t in _SPECIAL_TOKENS if tc.get(f"{t}_token") is not None or cfg.get(f"{t}_token_id") is not None]
    total += sum(_kv(f"tokenizer.ggml.{t}_token_id", 4) for t in special)
    total += sum(_kv(f"tokenizer.ggml.add_{t}_token", 1) for t in _SPECIAL_TOKENS
                 if isinstance(tc.get(f"add_{t}_token"), bool))
    template = tc.get("chat_template")
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, str):
        total += _kv("tokenizer.chat_template", _string(template))
    return total
