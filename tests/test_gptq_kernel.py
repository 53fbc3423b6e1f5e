"""The fused GPTQ block step (kernels/triton_gptq.py) against the torch loop (rounding/gptq.py).

The kernel is written to repeat the torch loop's IEEE operations one for one (see its module),
so results are compared for exact equality: codes, scales, zeros, the errors / U_jj and the
column losses. On CPU both sides are the same IEEE fp32 operations (numpy in the interpreter,
torch in the loop), so not even a tie may differ (the layers hold exact ties on purpose); a
tolerance would hide a wrong operation or order. What only a GPU can show (Triton's CUDA
lowering, torch's CUDA division by a Python number) is checked by ``benchmarks/gptq_kernel.py``.

As in tests/test_kernels.py, ``TRITON_INTERPRET=1`` must be set before Triton is imported, so
``test_gptq_kernel_under_the_triton_interpreter`` runs the ``test_interpreted_*`` tests in a
fresh process with it set; in any other process they skip. Rows 33 with 16-row programs leave a
partly masked last tile; one program per block elsewhere keeps the interpreter's time down
(it runs programs one after the other, a few ms per operation).
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.rounding.gptq import (
    Columns,
    block_path,
    block_step_torch,
    block_step_triton,
    gptq_with_losses_on,
    inverse_cholesky,
)
from bitalloc.rounding.rtn import group_view, rtn_params

from .interpreter import INTERPRETING, fix_numpy_scalars, run_interpreted

ROWS = 33
DEAD = -3  # a dead input column
CONSTANT_ROWS = (0.375, 0.0, -0.3125)  # fp16-exact values, kept exactly by constant groups
interpreted = pytest.mark.skipif(not INTERPRETING, reason="run in a fresh TRITON_INTERPRET=1 process "
                                 "by test_gptq_kernel_under_the_triton_interpreter")


def layer(cols: int, seed: int, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, H) of a layer with correlated inputs, heavy-tailed weights, a dead input (the third
    last column), constant rows (each group without the dead input has no range) and two rows
    whose first group holds exact ties for round-half-to-even (:func:`tie_rows`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    x = x + 0.5 * torch.randn(4 * cols, 1, generator=g)
    x[:, DEAD] = 0
    chi2 = torch.randn(3, ROWS, cols, generator=g).pow(2).mean(0)
    w = torch.randn(ROWS, cols, generator=g) / chi2.sqrt() * 0.02  # Student's t, 3 degrees of freedom
    w[:3] = torch.tensor(CONSTANT_ROWS)[:, None]
    w[3:5] = tie_rows(cols, bits, symmetric, g)
    return w, x.T @ x


def tie_rows(cols: int, bits: int, symmetric: bool, g: torch.Generator) -> torch.Tensor:
    """Two rows whose first group gets scale 1/16 and whose second column is then a tie, x / scale
    = 0.5: columns before it are on the grid (no error moves it); the second row's zero is a tie
    too, -lo / scale = 0.5 (asymmetric)."""
    qmax, s = 2**bits - 1, 2.0**-4
    top = (qmax / 2 if symmetric else qmax) * s  # the value that makes the group's scale s
    rows = torch.rand(2, cols, generator=g) * 0.8 + 0.1
    rows[0] = rows[0] * top * (2 if symmetric else 1) - (top if symmetric else 0)
    rows[1] = rows[1] * (qmax - 1.5) * s
    rows[0, :3] = torch.tensor([0.0, 0.5 * s, top])
    rows[1, :4] = torch.tensor([0.0, 0.5 * s, -0.5 * s, (qmax - 0.5) * s])
    return rows


def columns(cols: int, bits: int, group: int, symmetric: bool, static: bool, seed: int) -> Columns:
    """A block step's state as gptq_with_losses_on builds it (static groups: parameters from w)."""
    w, h = layer(cols, seed, bits, symmetric)
    w[:, DEAD], h[DEAD, DEAD] = 0, 1
    groups = -(-cols // group)
    scale, zero = torch.zeros(ROWS, groups), torch.zeros(ROWS, groups)
    if static:
        s, z = rtn_params(group_view(w, group), bits, symmetric)
        scale, zero = s[..., 0], z[..., 0]
    return Columns(w, inverse_cholesky(h, 0.01), torch.zeros_like(w), scale, zero,
                   torch.arange(cols) // group, bits, group, symmetric, static)


def clone(c: Columns) -> Columns:
    return Columns(*(v.clone() if isinstance(v, torch.Tensor) else v for v in vars(c).values()))


def assert_same(a: Columns, b: Columns) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.equal(a.w, b.w), "the kernel must only read the weights"


@pytest.fixture
def one_program_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitalloc.kernels import triton_gptq

    monkeypatch.setattr(triton_gptq, "DEFAULT", triton_gptq.Config(block_rows=64, num_warps=4))


# --- dispatch (any process) ---------------------------------------------------------------------

def test_the_kernel_path_is_taken_only_on_cuda_for_configurations_it_computes():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert block_path(torch.device("cpu"), 128, False) == "torch"
    assert block_path(cuda, 128, False) == "triton" and block_path(cuda, 32, False) == "triton"
    assert block_path(cuda, 256, False) == "torch"  # a dynamic group would straddle two blocks
    assert block_path(cuda, 48, False) == "torch"
    assert block_path(cuda, 256, True) == "triton"  # static groups are read, never computed
    assert block_path(cuda, 128, False, block=512) == "torch"  # wider than a tile


def test_torch_divides_by_python_numbers_exactly_on_cpu():
    """The rule the kernel follows on CPU (the interpreter tests) is the one torch has there."""
    pytest.importorskip("triton")
    from bitalloc.kernels.triton_gptq import torch_divides_by_reciprocal

    assert not torch_divides_by_reciprocal(torch.device("cpu"))


def test_forcing_the_kernel_on_a_configuration_it_does_not_compute_is_refused():
    pytest.importorskip("triton")
    w, h = layer(192, 0, 3, False)
    with pytest.raises(ValueError, match="does not compute"):
        gptq_with_losses_on("triton", w, h, 3, 256)
    c = columns(192, 3, 64, False, False, 0)
    with pytest.raises(ValueError, match="does not compute"):
        block_step_triton(c, 0, 96)  # ends inside a dynamic group


# --- the kernel under the interpreter ----------------------------------------------------------

def test_gptq_kernel_under_the_triton_interpreter():
    run_interpreted(__file__)


@pytest.fixture
def interpreter() -> None:

    fix_numpy_scalars()


@interpreted
@pytest.mark.usefixtures("interpreter", "one_program_per_block")
@pytest.mark.parametrize("cols,a,b,group,bits,symmetric,static", (
    (96, 0, 96, 32, 2, False, False), (96, 0, 96, 32, 8, True, True),  # the only block
    (256, 128, 256, 64, 3, False, True), (256, 128, 256, 64, 4, True, False),  # a later block
    (256, 0, 128, 32, 8, False, False),  # a first block with columns after it
    (192, 128, 192, 128, 4, False, False), (192, 128, 192, 128, 3, True, False),  # a short last block
    (192, 128, 192, 64, 2, True, True)))
def test_interpreted_block_step_equals_the_torch_loop(cols, a, b, group, bits, symmetric, static):
    ref = columns(cols, bits, group, symmetric, static, seed=bits)
    got = clone(ref)
    assert torch.equal(block_step_triton(got, a, b), block_step_torch(ref, a, b))
    assert_same(got, ref)
    assert bool((ref.codes[:, a:b] != 0).any())


@interpreted
@pytest.mark.usefixtures("interpreter", "one_program_per_block")
@pytest.mark.parametrize("cols,group,bits,symmetric,act_order", (
    (96, 32, 2, False, False), (192, 64, 3, True, False), (256, 128, 4, False, False),
    (256, 32, 8, True, False), (96, 64, 3, False, True), (192, 128, 2, True, True),
    (256, 32, 4, False, True), (192, 256, 8, False, True)))
def test_interpreted_gptq_on_the_kernel_equals_the_torch_loop(cols, group, bits, symmetric, act_order):
    w, h = layer(cols, cols + bits, bits, symmetric)
    q_ref, loss_ref = gptq_with_losses_on("torch", w, h, bits, group, symmetric, act_order)
    q, loss = gptq_with_losses_on("triton", w, h, bits, group, symmetric, act_order)
    assert torch.equal(q.codes, q_ref.codes)
    assert torch.equal(q.scale, q_ref.scale) and torch.equal(q.zero, q_ref.zero)
    assert torch.equal(loss, loss_ref)
    assert float(loss[DEAD]) == 0.0 and bool((loss > 0).sum() > cols // 2)  # a dead input costs nothing
    if not act_order:  # constant groups are reproduced exactly (the last one holds the dead input's 0)
        before = (cols - 1) // group * group
        assert torch.equal(q.dequantize()[:3, :before], torch.tensor(CONSTANT_ROWS)[:, None].expand(3, before))


@interpreted
@pytest.mark.usefixtures("interpreter")
def test_interpreted_row_tiles_with_a_masked_last_one(monkeypatch: pytest.MonkeyPatch):
    """16-row programs: 33 rows are three tiles, the last with one live row."""
    from bitalloc.kernels import triton_gptq

    monkeypatch.setattr(triton_gptq, "DEFAULT", triton_gptq.Config(block_rows=16, num_warps=4))
    ref = columns(192, 3, 64, False, False, seed=7)
    got = clone(ref)
    assert torch.equal(block_step_triton(got, 0, 128), block_step_torch(ref, 0, 128))
    assert_same(got, ref)
