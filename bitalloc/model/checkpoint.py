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
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on header size


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


class Checkpoint:
    """A validated local checkpoint directory (config.json + one or several safetensors files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model directory not found: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"model path is not a directory: {self.path}")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path} has no config.json (expected a Hugging Face model directory)")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{cfg} is not valid JSON") from None
        self.arch: str = str(self.config.get("model_type", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise CheckpointError(
                f"unsupported architecture {self.arch or '(none)'!r} in {cfg}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        self.config_sha256 = _sha256_file(cfg)
        self.tensors, self.index_sha256 = self._scan()
        self._handles: dict[Path, Any] = {}

    def _scan(self) -> tuple[dict[str, TensorInfo], str]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index} is corrupt (no weight_map)") from None
            files = sorted({self.path / f for f in weight_map.values()})
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
