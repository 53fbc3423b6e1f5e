"""Local Hugging Face checkpoints: validation, tensor listing from headers, lazy loading.

Listing tensors reads only the safetensors headers (a few KB per shard), so building the
unit inventory of a 70B or 235B checkpoint costs no weight I/O. Weights are read one
tensor at a time through safetensors' memory-mapped reader when a layer needs them.
Nothing here writes to the checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..plan import check_path

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on header size
# config fields every supported architecture needs, as positive integers (the model is built from them)
_REQUIRED_INTS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
                  "num_experts", "num_experts_per_tok")
# A checkpoint that bitalloc writes with MoE experts decomposed (BitsMoE: a shared basis plus factors, no expert
# weights) names this model_type, which no transformers release knows: plain ``from_pretrained`` then refuses the
# directory, rather than loading the rest and initializing the missing experts at random. The architecture it was
# made from stays under DECOMPOSED_KEY (docs/checkpoint.md).
DECOMPOSED_MODEL_TYPE = "bitalloc_bitsmoe"
DECOMPOSED_KEY = "bitalloc_decomposition"
_LAYER_INDEX_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse and sanity-check a safetensors header; truncated or corrupt files raise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path} is corrupt or truncated (header length {n} exceeds file size {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not a table)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            want = _DTYPE_BYTES[info["dtype"]]
            for s in info["shape"]:
                want *= s
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt (bad entry for tensor {name!r})") from None
        if stop - start != want:
            raise CheckpointError(f"{path} is corrupt (tensor {name!r} has {stop - start} bytes, expected {want})")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated ({size} bytes, tensors need {8 + n + end})")
    return header, raw


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def architecture(config: dict[str, Any]) -> str:
    """The config's model_type; for a decomposed bitalloc checkpoint, the one it was made from."""
    model_type = str(config.get("model_type", ""))
    if model_type != DECOMPOSED_MODEL_TYPE:
        return model_type
    marker = config.get(DECOMPOSED_KEY)
    return str(marker.get("model_type", "")) if isinstance(marker, dict) else ""


def _check_config(config: Any, cfg: Path) -> None:
    """Refuse a config.json whose fields the model cannot be built from, naming the field and the fix."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg} is not a JSON object (found {type(config).__name__}); "
                              "a Hugging Face config.json maps field names to values")
    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        if key not in config or (key in _OPTIONAL_INTS and config[key] is None):
            if key in _REQUIRED_INTS and not (key == "intermediate_size" and "moe_intermediate_size" in config):
                raise CheckpointError(f"{cfg} has no {key!r}; add it (a positive integer) from the model's original "
                                      "config")
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{cfg}: {key} is {value!r}; it must be a positive integer")
    if "head_dim" not in config and config["hidden_size"] % config["num_attention_heads"]:
        raise CheckpointError(f"{cfg}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                              f"{config['num_attention_heads']} and no head_dim is given; fix either field")
    if "tie_word_embeddings" in config and not isinstance(config["tie_word_embeddings"], bool):
        raise CheckpointError(f"{cfg}: tie_word_embeddings is {config['tie_word_embeddings']!r}; it must be true or "
                              "false")


def _inside(root: Path, name: Any) -> Path:
    """The shard ``name`` of an index, refused unless it is a plain file name inside the model directory.

    Security: an index is data from whoever shared the model; an absolute path, ``..`` or a symlink
    leaving the directory would make bitalloc read (and hash) files elsewhere on the machine.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{root / 'model.safetensors.index.json'} names shard {name!r}, which is not a file "
                              "name inside the model directory; fix the index's weight_map")
    path = root / name
    check_path(path, "shard", CheckpointError)
    real, home = path.resolve(), root.resolve()
    # a Hugging Face hub cache snapshot links its files to ../../blobs: that is still the model's own storage
    if not (real.is_relative_to(home) or real.is_relative_to(home.parent.parent / "blobs")):
        raise CheckpointError(f"shard {name!r} listed in the index resolves outside {root} (a symlink?); refusing "
                              "to read it: copy the file into the model directory")
    return path


class Checkpoint:
    """A validated local checkpoint directory (config.json + one or several safetensors files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_path(self.path, "model directory", CheckpointError)
        if not self.path.exists():
            raise CheckpointError(f"model directory not found: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"model path is not a directory: {self.path}")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path} has no config.json (expected a Hugging Face model directory)")
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{cfg} is not valid JSON") from None
        self.arch: str = architecture(config) if isinstance(config, dict) else ""
        if isinstance(config, dict) and self.arch not in SUPPORTED_ARCHS:
            raise CheckpointError(
                f"unsupported architecture {self.arch or '(none)'!r} in {cfg}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        _check_config(config, cfg)
        self.config: dict[str, Any] = config
        self.config_sha256 = _sha256_file(cfg)
        self.tensors, self.index_sha256 = self._scan()
        self._check_shapes(cfg)
        self._handles: dict[Path, Any] = {}

    def _check_shapes(self, cfg: Path) -> None:
        """Refuse a config that disagrees with the tensors: the model would be built wrong, or crash mid-run."""
        layers = {int(m.group(1)) for name in self.tensors if (m := _LAYER_INDEX_RE.search(name))}
        n = self.config["num_hidden_layers"]
        if layers and (len(layers) != n or max(layers) != n - 1):  # never build range(n): n may be 10^9
            have = f"layers 0..{max(layers)}" if len(layers) == max(layers) + 1 else \
                f"layer indices {sorted(layers)[:8]}"
            raise CheckpointError(f"{cfg} says num_hidden_layers={n}, but the weights hold {have}; fix the config or "
                                  "restore the missing shards")
        emb = next((t for name, t in self.tensors.items() if name.endswith("embed_tokens.weight")), None)
        if emb is None:
            return
        want = (self.config["vocab_size"], self.config["hidden_size"])
        if len(emb.shape) != 2 or tuple(emb.shape) != want:
            raise CheckpointError(f"{emb.name} has shape {list(emb.shape)}, but {cfg} says vocab_size={want[0]} and "
                                  f"hidden_size={want[1]}; the config does not belong to these weights")

    def _scan(self) -> tuple[dict[str, TensorInfo], str]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(f"{index} is corrupt (no weight_map)") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: weight_map is {type(weight_map).__name__}, not a non-empty object "
                                      "mapping tensor names to shard files; fix or regenerate the index")
            files = sorted({_inside(self.path, f) for f in weight_map.values()})
            digest = _sha256_file(index)
        elif single.is_file():
            files, weight_map = [single], None
            digest = None
        else:
            raise CheckpointError(f"{self.path} has no model.safetensors or model.safetensors.index.json")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in the index is missing from {self.path}")
            header, raw = read_safetensors_header(f)
            if digest is None:
                digest = hashlib.sha256(raw).hexdigest()
            for name, info in header.items():
                if name != "__metadata__":
                    tensors[name] = TensorInfo(name, tuple(info["shape"]), info["dtype"], f)
        if weight_map is not None:
            missing = [k for k in weight_map if k not in tensors]
            if missing:
                raise CheckpointError(f"tensor {missing[0]!r} is in the index but not in its shard")
        return tensors, digest

    @cached_property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def load(self, name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """Read one tensor (memory-mapped, then copied), converted to ``dtype``."""
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot open {info.file}: {exc}") from None
            self._handles[info.file] = handle
        t = handle.get_tensor(name)
        return t if dtype is None else t.to(dtype)
