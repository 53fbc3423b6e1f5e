"""Forward hooks that accumulate each linear input's second moment H = sum x^T x on a materialised layer.

Shared by the sensitivity pass (Hessian scores, GPTQ-based BAQ) and by rounding (GPTQ and its
successors need the same H). Units that read the same input (q/k/v; gate/up, per expert) share one
H, so it is computed once. MoE experts see only the tokens routed to them, counted per expert, for
transformers' fused experts module (inputs: hidden states, top-k indices, top-k weights).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from ..errors import BitallocError
from ..plan import Role
from .distributed import Group
from .inventory import Unit
from .layerwise import EXPERT_ROLES, expert_slice

SAME_INPUT = {Role.attn_q: "attn_in", Role.attn_k: "attn_in", Role.attn_v: "attn_in", Role.mlp_gate: "mlp_in",
              Role.mlp_up: "mlp_in", Role.shared_gate: "shared_in", Role.shared_up: "shared_in",
              Role.expert_gate: "expert_in", Role.expert_up: "expert_in"}


def input_key(u: Unit) -> str:
    """Units that read the same input (q/k/v; gate/up, per expert) share one H."""
    return f"{u.layer}.{SAME_INPUT[u.role]}.{u.expert}" if u.role in SAME_INPUT else u.tensor


class InputStats:
    """Forward hooks on a materialised layer: H = sum x^T x and token counts per input (routed for experts)."""

    def __init__(self, layer: nn.Module, units: list[Unit]):
        self.key = {u.tensor: input_key(u) for u in units}
        self._h: dict[str, torch.Tensor] = {}
        self._h32: dict[str, torch.Tensor] = {}  # fp32 copies handed out (see hessian)
        self._tokens: dict[str, int] = defaultdict(int)
        self.hooks = []
        self._finished = False
        params = dict(layer.named_parameters())
        self.device = next(iter(params.values())).device if params else torch.device("cpu")
        modules: dict[str, str] = {}  # input key -> the one module hooked for it
        expert_units: list[Unit] = []
        for u in units:
            if u.role in EXPERT_ROLES and u.local not in params:
                expert_units.append(u)
            else:
                modules.setdefault(self.key[u.tensor], u.module.split(f".{u.layer}.", 1)[1])
        for key, local_module in modules.items():
            self.hooks.append(layer.get_submodule(local_module).register_forward_hook(self._linear_hook(key)))
        if expert_units:
            experts = layer.get_submodule("mlp.experts")
            self.hooks.append(experts.register_forward_hook(self._experts_hook(experts, expert_units)))

    def hessian(self, tensor: str) -> Optional[torch.Tensor]:
        """H of the tensor's input in fp32 (accumulated in fp64, see :meth:`add`)."""
        key = self.key[tensor]
        if key not in self._h32 and key in self._h:
            self._h32[key] = self._h[key].float()
        return self._h32.get(key)

    def tokens(self, tensor: str) -> int:
        return self._tokens[self.key[tensor]]

    def add(self, key: str, x: torch.Tensor) -> None:
        """Add one batch's x^T x (computed in fp32) to an fp64 sum.

        Why fp64: the order of the sum depends on how sequences are batched and on how many processes
        share them (``model.distributed``); in fp32 the last bits of H then differ, and GPTQ's rounding
        decisions (BAQ's column losses) amplify that to 1e-4. Summed in fp64 and rounded once, H is the
        same fp32 matrix however the sequences were split.
        """
        x = x.detach().reshape(-1, x.shape[-1]).float()
        h = (x.T @ x).double()
        if key in self._h:
            self._h[key] += h
        else:
            self._h[key] = h
        self._h32.pop(key, None)
        self._tokens[key] += x.shape[0]

    def _linear_hook(self, key: str):
        def hook(_mod, inputs, _out):
            self.add(key, inputs[0])
        return hook

    def _experts_hook(self, experts: nn.Module, units: list[Unit]):
        """Routed inputs per expert for transformers' fused experts (hidden, top_k_index, top_k_weights)."""
        by_expert: dict[int, dict[Role, Unit]] = defaultdict(dict)
        for u in units:
            by_expert[u.expert][u.role] = u

        def hook(_mod, inputs, _out):
            hidden, index = inputs[0].detach(), inputs[1]
            with torch.no_grad():
                for e, role in by_expert.items():
                    x = hidden[(index == e).any(-1).nonzero().flatten()]
                    up_in = role.get(Role.expert_gate) or role.get(Role.expert_up)
                    if up_in is not None:
                        self.add(self.key[up_in.tensor], x)
                    if Role.expert_down in role:
                        gate, up = expert_hidden(experts, e, x)
                        self.add(self.key[role[Role.expert_down].tensor], experts.act_fn(gate) * up)
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def finish(self, group: Group) -> None:
        """Stop collecting; in a distributed pass, sum H and token counts over the ranks (once).

        A rank may have no H for an input that another rank saw (an expert none of its tokens were
        routed to): it joins the sum with zeros, so every rank ends with the same set of inputs.
        """
        if self._finished:
            return
        self.close()
        self._finished = True
        if not group.active:
            return
        dims: dict[str, int] = {}
        for part in group.gather({k: h.shape[0] for k, h in self._h.items()}):
            dims.update(part)
        keys = sorted(dims)
        for key in keys:
            h = self._h.get(key)
            if h is None:
                h = self._h[key] = torch.zeros(dims[key], dims[key], device=self.device, dtype=torch.float64)
            group.sum_(h)
            self._h32.pop(key, None)
        for key, n in zip(keys, group.sum_float(*(self._tokens[k] for k in keys))):
            self._tokens[key] = int(n)


def linear_module(layer: nn.Module, unit: Unit) -> Optional[str]:
    """The local name of the ``nn.Linear`` whose whole weight is ``unit``, or None (fused experts, other modules)."""
    if unit.role in EXPERT_ROLES:
        return None
    name = unit.local.rsplit(".", 1)[0]
    try:
        mod = layer.get_submodule(name)
    except AttributeError:
        return None
    return name if isinstance(mod, nn.Linear) and unit.local.endswith(".weight") else None


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate pre-activation, up) of expert ``e`` on its routed inputs ``x``: act(gate) * up is down's input.

    The SwiGLU form of transformers' fused experts (Qwen3-MoE, Mixtral, DeepSeek); ``SampleGrads`` checks
    it against the module's own output, so a different experts forward is refused rather than mis-scored.
    """
    gate = expert_slice(experts.gate_up_proj.data, experts, Role.expert_gate, e)
    up = expert_slice(experts.gate_up_proj.data, experts, Role.expert_up, e)
    return x @ gate.T, x @ up.T


class SampleGrads:
    """Each sequence's own weight gradient of a layer's units, from one backward pass over a batch.

    Why: autograd sums a batch's weight gradients, but the gradient statistics need every sequence's
    g_s = sum_t dy_{s,t} x_{s,t}^T separately, which used to cost one backward pass per sequence
    (hundreds of small launches each, the weights' own gradients computed and thrown away). Here the
    layer's parameters need no gradient at all: forward hooks keep each linear's input and output,
    one backward of the batch gives dL/dy of every output, and g_s is one batched matmul per unit, the
    same arithmetic as autograd's weight gradient.

    Routed experts (transformers' fused experts module, called with hidden states, top-k indices and
    top-k weights) are hooked as one module: from dL/d(its output) and the routing, each expert's
    gate, up and down gradients are recomputed per sequence on the tokens routed to it (the output
    gradient of a token scaled by its routing weight). The recomputation assumes the SwiGLU expert
    (``expert_hidden``); ``check_experts`` compares it with the module's output and raises if they differ.
    """

    EXPERTS = "mlp.experts"

    def __init__(self, layer: nn.Module, units: list[Unit], check_experts: bool = False):
        self._x: dict[str, torch.Tensor] = {}
        self._y: dict[str, torch.Tensor] = {}
        self._dy: dict[str, torch.Tensor] = {}
        self._by_expert: dict[int, dict[Role, str]] = defaultdict(dict)
        self._expert_of: dict[str, int] = {}
        self._done: dict[str, torch.Tensor] = {}  # expert grads computed with a sibling's, not yet taken
        self._routed: tuple[torch.Tensor, ...] = ()  # the experts' call: hidden [N, d], top-k indices, weights
        self._batch = 0
        self._check = check_experts
        self.hooks = []
        for u in units:
            module = linear_module(layer, u)
            if module is not None:
                self.hooks.append(layer.get_submodule(module).register_forward_hook(self._hook(u.tensor)))
            elif u.role in EXPERT_ROLES:
                self._by_expert[u.expert][u.role] = u.tensor
                self._expert_of[u.tensor] = u.expert
            else:
                raise BitallocError(f"{u.tensor} is neither a linear layer nor a fused expert; the calibration pass "
                                    "cannot take its per-sequence gradients")
        if self._by_expert:
            self.experts = layer.get_submodule(self.EXPERTS)
            self.hooks.append(self.experts.register_forward_hook(self._experts_hook))

    def _hook(self, key: str):
        def hook(_mod, inputs, out):
            self._x[key], self._y[key] = inputs[0].detach(), out
        return hook

    def _experts_hook(self, _mod, inputs, out):
        self._routed = tuple(t.detach() for t in inputs[:3])
        self._y[self.EXPERTS] = out

    def backward(self, y: torch.Tensor, x: torch.Tensor, dl_dy: torch.Tensor, want_input: bool) -> Optional[torch.Tensor]:
        """Backpropagate ``dl_dy`` from the layer output ``y``; returns dL/dx when ``want_input``.

        ``x`` (the layer input) must require grad so that a graph exists even when the parameters do not.
        """
        self.close()
        self._batch = x.shape[0]
        if self._check and self._by_expert:
            self._check_experts()
        keys = list(self._y)
        wrt = [self._y.pop(k) for k in keys] + ([x] if want_input else [])
        grads = torch.autograd.grad(y, wrt, dl_dy) if wrt else ()
        self._dy = dict(zip(keys, grads))
        return grads[-1] if want_input else None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def weight_grad(self, key: str) -> torch.Tensor:
        """[batch, out, in] fp32: one sequence's weight gradient per row, consumed (freed) on return."""
        if key in self._done:
            return self._done.pop(key)
        if key not in self._x:
            self._done.update(self._expert_grads(self._expert_of[key]))
            return self._done.pop(key)
        x, dy = self._x.pop(key), self._dy.pop(key)
        x = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        dy = dy.reshape(dy.shape[0], -1, dy.shape[-1]).float()
        return torch.bmm(dy.transpose(1, 2), x)

    def _expert_grads(self, e: int) -> dict[str, torch.Tensor]:
        """Per-sequence gradients of expert ``e``'s swept weights, by tensor name."""
        tok, x, w = self._routed_to(e)
        dy = self._dy[self.EXPERTS][tok].float() * w  # dL/d(expert output)
        with torch.enable_grad():
            g, u = (t.detach().requires_grad_(True) for t in expert_hidden(self.experts, e, x))
            h = self.experts.act_fn(g) * u
            dg, du = torch.autograd.grad(h, (g, u), dy @ self._down(e))
        factors = {Role.expert_gate: (dg, x), Role.expert_up: (du, x), Role.expert_down: (dy, h.detach())}
        seq = tok // (self._routed[0].shape[0] // self._batch)
        out = {}
        for role, name in self._by_expert[e].items():
            a, b = factors[role]
            grads = torch.zeros(self._batch, a.shape[1], b.shape[1], device=a.device)
            for s in seq.unique().tolist():
                m = seq == s
                grads[s] = a[m].T @ b[m]
            out[name] = grads
        return out

    def _routed_to(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token indices, their inputs fp32, their routing weights [n, 1]) of the tokens routed to expert ``e``."""
        hidden, index, weights = self._routed
        tok, pos = (index == e).nonzero(as_tuple=True)
        return tok, hidden[tok].float(), weights[tok, pos].float()[:, None]

    def _down(self, e: int) -> torch.Tensor:
        return expert_slice(self.experts.down_proj.data, self.experts, Role.expert_down, e)

    def _check_experts(self) -> None:
        """The recomputed experts (``expert_hidden``, weighted by routing) must give the module's output."""
        with torch.no_grad():
            mine = torch.zeros_like(self._y[self.EXPERTS], dtype=torch.float32)
            for e in self._routed[1].unique().tolist():
                if not 0 <= e < self.experts.gate_up_proj.shape[0]:
                    continue
                tok, x, w = self._routed_to(e)
                g, u = expert_hidden(self.experts, e, x)
                mine.index_add_(0, tok, (self.experts.act_fn(g) * u) @ self._down(e).T * w)
            theirs = self._y[self.EXPERTS].detach().float()
            err = float((mine - theirs).norm() / theirs.norm().clamp_min(1e-30))
        if err > 1e-4:
            raise BitallocError(f"the experts of {type(self.experts).__name__} do not compute act(gate) * up -> down "
                                f"weighted by routing (relative difference {err:.1e}); this architecture's experts "
                                "are not supported by the calibration pass")
