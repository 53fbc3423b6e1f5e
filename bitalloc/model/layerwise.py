"""Run a checkpoint one decoder layer at a time.

The transformers model is built on the ``meta`` device (no memory), and each decoder
layer is materialised from the checkpoint only while it runs, then released. Peak weight
memory is therefore one decoder layer in fp32 plus the embedding and head, whatever the
model size. Hidden states between layers live in an :class:`ActivationStore`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import BitallocError, CheckpointError, OutputError
from ..plan import Role
from .checkpoint import Checkpoint
from .inventory import Unit
from .prefetch import Prefetch


EXPERT_ROLES = (Role.expert_gate, Role.expert_up, Role.expert_down)  # held fused in transformers>=5


_RUN_DIR: ContextVar[Optional[str]] = ContextVar("bitalloc_run_dir", default=None)


@contextmanager
def run_workdir(parent: Optional[str | os.PathLike] = None) -> Iterator[str]:
    """A fresh directory for one run's temporary files, inside ``parent`` (default: $TMPDIR), removed on exit.

    Why one directory: activation stores are tens of megabytes to gigabytes each, and a run interrupted
    by SIGTERM or SIGHUP used to leave them in $TMPDIR. Removing one directory in a ``finally`` (the CLI
    turns those signals into exceptions) cleans up every file, including stores made by code that
    never heard of the directory: an :class:`ActivationStore` made inside this context goes here.
    """
    where = parent if parent is not None else tempfile.gettempdir()
    try:
        path = tempfile.mkdtemp(prefix="bitalloc-run-", dir=where)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise OutputError(f"cannot create a work directory in {where}: {reason}; give a writable --workdir") from None
    token = _RUN_DIR.set(path)
    try:
        yield path
    finally:
        _RUN_DIR.reset(token)
        shutil.rmtree(path, ignore_errors=True)


class ActivationStore:
    """[n_seq, seqlen, hidden] fp32 buffer, memory-mapped from a temporary file.

    Pages that the OS cannot keep in RAM go to disk, so the sensitivity pass of a model
    whose calibration activations exceed memory still runs (slower), instead of failing.
    The file goes in ``workdir``, else the current :func:`run_workdir`, else $TMPDIR.
    """

    def __init__(self, n_seq: int, seqlen: int, hidden: int, workdir: Optional[str | os.PathLike] = None):
        where = workdir if workdir is not None else _RUN_DIR.get()
        fd, self._path = tempfile.mkstemp(prefix="bitalloc-act-", suffix=".bin", dir=where)
        os.close(fd)
        numel = n_seq * seqlen * hidden
        self.tensor = torch.from_file(self._path, shared=True, size=numel, dtype=torch.float32).view(n_seq, seqlen, hidden)

    def close(self) -> None:
        del self.tensor
        Path(self._path).unlink(missing_ok=True)

    def __del__(self) -> None:
        if Path(self._path).exists():
            Path(self._path).unlink(missing_ok=True)


class LayerwiseModel:
    """A transformers causal LM whose decoder layers are loaded on demand."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = ckpt
        self.device = resolve_device(device)
        try:
            config = AutoConfig.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise CheckpointError(f"transformers cannot read {ckpt.path / 'config.json'}: {exc}") from None
        config._attn_implementation = "sdpa"
        self.config = config
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        base = self.skeleton.model
        self.layers: nn.ModuleList = base.layers
        self.layer_prefix = _find_prefix(self.skeleton, self.layers)
        self.rotary = type(base.rotary_emb)(config=config).to(self.device)
        self.num_layers = len(self.layers)
        self._embed_name = _param_name(self.skeleton, base.embed_tokens.weight)
        self._norm_name = _param_name(self.skeleton, base.norm.weight)
        self.norm = base.norm
        head = self.skeleton.lm_head.weight
        self._head_name = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else self._embed_name
        self._head_shape = tuple(head.shape)
        self._prefetch = Prefetch(self._host_layer, self.num_layers, background=self.device.type == "cuda")

    # ---- weights -------------------------------------------------------------------------
    def load_layer(self, i: int) -> nn.Module:
        """Materialise decoder layer ``i`` in fp32 on the device from the checkpoint.

        On CUDA the next layer's tensors are read from disk into pinned host memory by a background
        thread meanwhile (:class:`~bitalloc.model.prefetch.Prefetch`), so disk and page-cache reads overlap
        the GPU's work on this layer, and the copy to the device is a DMA that does not block the host.
        """
        layer = self.layers[i]
        prefix = f"{self.layer_prefix}.{i}."
        host = self._prefetch.get(i)
        state = {local: t.to(self.device, torch.float32, non_blocking=True) for local, t in host.items()}
        self._check_finite({prefix + local: t for local, t in state.items()})
        layer.load_state_dict(state, assign=True, strict=True)
        return layer

    def release_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    def _host_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors as stored (the file's dtype), on the host; pinned when the pass runs on CUDA."""
        layer = self.layers[i]
        prefix = f"{self.layer_prefix}.{i}."
        out = {}
        for local, p in layer.state_dict(keep_vars=True).items():
            t = self._read_param(prefix, local, layer, tuple(p.shape))
            if self.device.type == "cuda":
                t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
            out[local] = t
        return out

    def _read_param(self, prefix: str, local: str, layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
        name = prefix + local
        if name in self.ckpt.tensors:
            t = self.ckpt.load(name)
        elif local.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t = self._assemble_fused(prefix, local, layer)
        else:
            raise CheckpointError(f"checkpoint {self.ckpt.path} lacks tensor {name!r} needed by {self.config.model_type}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, the architecture expects {shape}")
        return t

    def _assemble_fused(self, prefix: str, local: str, layer: nn.Module) -> torch.Tensor:
        """Build transformers' fused expert tensor from a per-expert checkpoint."""
        experts = layer.get_submodule(local.rsplit(".", 1)[0])
        n = experts.num_experts
        base = prefix + local.rsplit(".", 1)[0]
        load = self.ckpt.load
        if local.endswith("gate_up_proj"):
            per = [torch.cat([load(f"{base}.{e}.gate_proj.weight"), load(f"{base}.{e}.up_proj.weight")])
                   for e in range(n)]
        else:
            per = [load(f"{base}.{e}.down_proj.weight") for e in range(n)]
        t = torch.stack(per)
        return t.transpose(1, 2) if getattr(experts, "is_transposed", False) else t

    def _load(self, name: str) -> torch.Tensor:
        """A checkpoint tensor in fp32 on the pass device, refused if it holds NaN or Inf."""
        t = self.ckpt.load(name).to(self.device, torch.float32)
        self._check_finite({name: t})
        return t

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse weights that hold NaN or Inf, with one device-to-host sync for all of ``tensors``.

        Checked here, where every weight the model runs with is read: one non-finite weight turns every
        activation after it into NaN, which used to surface as a linear-algebra traceback deep in the
        sensitivity pass, or as ``perplexity nan`` with exit 0. The check runs on the device (a CPU scan of
        a bf16 tensor costs more than the copy).
        """
        flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
        if bool(flags.all()):
            return
        name, t = next((n, t) for (n, t), ok in zip(tensors.items(), flags.tolist()) if not ok)
        raise CheckpointError(f"tensor {name!r} of {self.ckpt.path} holds {int((~torch.isfinite(t)).sum())} NaN or "
                              "Inf value(s); the checkpoint is corrupt: export or download it again")

    def embedding_weight(self) -> torch.Tensor:
        return self._load(self._embed_name)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm weight, lm_head weight) in fp32; the head is the embedding when tied."""
        return self._load(self._norm_name), self._load(self._head_name)

    # ---- compute -------------------------------------------------------------------------
    def position_embeddings(self, seqlen: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seqlen, device=self.device).unsqueeze(0).expand(batch, -1)
        dummy = torch.zeros(1, device=self.device, dtype=torch.float32)
        return self.rotary(dummy, pos)

    def run_layer(self, layer: nn.Module, h: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One decoder layer, causal attention (sdpa with no mask = causal), no KV cache."""
        out = layer(h, attention_mask=None, position_ids=None, position_embeddings=pos_emb, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, h: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
        """The model's final RMS norm: the inputs of the lm_head."""
        var = h.pow(2).mean(-1, keepdim=True)
        return h * torch.rsqrt(var + self.norm.variance_epsilon) * norm_w

    def head_logits(self, h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor) -> torch.Tensor:
        return self.final_norm(h, norm_w) @ head_w.T

    def run_layer_batched(self, layer: nn.Module, src: torch.Tensor, dst: torch.Tensor, batch: int) -> None:
        """``dst[s] = layer(src[s])`` for all sequences, ``batch`` at a time (``dst`` may be ``src``)."""
        n_seq, seqlen = src.shape[:2]
        pos = self.position_embeddings(seqlen, min(batch, n_seq))
        with torch.no_grad():
            for b in iter_batches(n_seq, batch):
                n = b.stop - b.start
                out = self.run_layer(layer, src[b].to(self.device), (pos[0][:n], pos[1][:n]))
                dst[b] = out.to(dst.device)

    def total_loss(self, h: torch.Tensor, ids: torch.Tensor, norm_w: torch.Tensor,
                   head_w: torch.Tensor) -> tuple[float, int]:
        """(sum of next-token cross-entropies, number of predicted tokens) over all sequences.

        One sequence at a time: the logits of a batch (batch x seqlen x vocab floats, and as much
        again for the softmax) would otherwise be the largest allocation of the whole pipeline.
        """
        total = 0.0
        with torch.no_grad():
            for s in range(len(ids)):
                total += window_loss(self.head_logits(h[s].to(self.device), norm_w, head_w), ids[s])
        return total, ids.shape[0] * (ids.shape[1] - 1)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)


def window_loss(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Sum of the next-token cross-entropies of one evaluation window (``logits`` [seqlen, vocab] of its
    tokens): the unit of the evaluation protocol, defined once for the layer-by-layer evaluator and for the
    quantized checkpoint's, so that their perplexities compare."""
    return float(nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' picks the first GPU when there is one; anything torch cannot use is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise BitallocError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BitallocError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    return device


def unit_param(layer: nn.Module, unit: Unit) -> tuple[nn.Parameter, str]:
    """The parameter of a materialised layer that holds ``unit`` (a fused 3-D one for fused experts)."""
    params = dict(layer.named_parameters())
    if unit.local in params:
        return params[unit.local], unit.local
    if unit.role in EXPERT_ROLES:
        which = "down_proj" if unit.role == Role.expert_down else "gate_up_proj"
        return getattr(layer.get_submodule("mlp.experts"), which), f"mlp.experts.{which}"
    raise CheckpointError(f"cannot find {unit.tensor} inside decoder layer {unit.layer}")


def unit_view(layer: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight inside a materialised layer, as an [out, in] view.

    Writing into the view (``copy_``) changes the layer's weight in place; for fused experts
    the view is a slice of the 3-D parameter (transposed where the layout stores [in, out]).
    """
    return unit_slice(unit_param(layer, unit)[0].data, layer, unit)


def unit_slice(full: torch.Tensor, layer: nn.Module, unit: Unit) -> torch.Tensor:
    """The same slice as :func:`unit_view` applied to another tensor shaped like the parameter (e.g. its grad)."""
    if unit.role not in EXPERT_ROLES or full.dim() == 2:
        return full
    return expert_slice(full, layer.get_submodule("mlp.experts"), unit.role, unit.expert)


def expert_slice(full: torch.Tensor, experts: nn.Module, role: Role, expert: int) -> torch.Tensor:
    """[out, in] view of one expert's gate, up or down weight inside transformers' fused 3-D tensors.

    The layout flags are the ones transformers' experts interface sets on the module:
    ``is_transposed`` ([E, in, out] storage) and ``is_concatenated`` ([gate; up] rather than
    interleaved rows).
    """
    w = full[expert]
    if getattr(experts, "is_transposed", False):
        w = w.T
    if role != Role.expert_down:
        inter = w.shape[0] // 2
        if getattr(experts, "is_concatenated", True):
            w = w[:inter] if role == Role.expert_gate else w[inter:]
        else:
            w = w[0::2] if role == Role.expert_gate else w[1::2]
    return w


def _find_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise CheckpointError("cannot locate decoder layers in the model")


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    raise CheckpointError("cannot locate a parameter in the model")


def iter_batches(n: int, batch: int) -> Iterator[slice]:
    for s in range(0, n, batch):
        yield slice(s, min(n, s + batch))
