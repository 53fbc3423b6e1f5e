"""bitalloc.kernels on CPU: exact packing round trips, the reference against independent math,
the Triton kernels under the interpreter against the reference, and QuantLinear / the custom op.

Triton decides at decoration time whether a ``@triton.jit`` function (its own ``tl.zeros`` too)
is interpreted, so ``TRITON_INTERPRET=1`` must be set before anything imports ``triton.language``
(transformers and compressed-tensors do). ``test_kernels_under_the_triton_interpreter`` therefore
runs the ``test_interpreted_*`` tests of this file in a fresh process with it set; in any other
process they skip. Two interpreter limits of triton 3.6 shape them: with numpy >= 2.4 its scalars
fail ``int()`` (triton-lang/triton#9171; patched below, in that process only), and its ``tl.dot``
reads bf16 operands as raw bits, so the tensor-core GEMM is checked here in fp16 and in bf16 on
the GPU (``benchmarks/kernels.py --check``).
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.kernels import reference
from bitalloc.kernels.codes import Codes
from bitalloc.kernels.layout import TILE, repack, unrepack
from bitalloc.kernels.quant_linear import QuantLinear

from .interpreter import INTERPRETING, fix_numpy_scalars, run_interpreted

WIDTHS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
SHAPES = ((33, 96), (33, 192), (7, 200), (5, 1100), (1, 5))


def make_codes(out: int, inp: int, bits: int, group: int, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0) -> Codes:
    g = torch.Generator().manual_seed(seed * 1000 + bits * 100 + group + out * 7 + inp)
    groups = -(-inp // group)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)
    codes[0, : min(inp, 4)] = torch.tensor([0, (1 << bits) - 1, 0, (1 << bits) - 1])[: min(inp, 4)]
    zeros = torch.randint(0, 1 << bits, (out, groups), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out, groups, generator=g) * 0.05 + 0.001).to(dtype)
    return Codes(codes, scales, zeros, bits, group)


def assert_same_codes(a: Codes, b: Codes) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales, b.scales)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)


# --- compressed-tensors pack-quantized --------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip_is_exact(bits, group, shape):
    pytest.importorskip("compressed_tensors")
    from bitalloc.kernels.packing import pack, unpack

    c = make_codes(*shape, bits, group)
    t = pack(c)
    out, inp = shape
    assert t["weight_packed"].dtype == torch.int32
    assert tuple(t["weight_packed"].shape) == (out, -(-inp * bits // 32))
    assert tuple(t["weight_zero_point"].shape) == (-(-out * bits // 32), -(-inp // group))
    assert t["weight_shape"].tolist() == [out, inp]
    assert_same_codes(unpack(t, bits, group), c)


@pytest.mark.parametrize("bits", WIDTHS)
def test_packed_words_hold_unsigned_codes_densely(bits):
    """The mapping documented in packing.py: bit k*bits of a row is our unsigned code k."""
    pytest.importorskip("compressed_tensors")
    from bitalloc.kernels.packing import pack

    c = make_codes(3, 70, bits, 32)
    words = pack(c)["weight_packed"].to(torch.int64) & 0xFFFFFFFF
    for n in range(3):
        stream = sum(int(w) << (32 * i) for i, w in enumerate(words[n].tolist()))
        got = [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(70)]
        assert got == c.codes[n].tolist()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", (32, 128))
def test_reference_matches_compressed_tensors_decompression(bits, group):
    """Our (q - zero) * scale on unsigned codes == the library's own reader on its signed ones."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from bitalloc.kernels.packing import pack

    c = make_codes(33, 256, bits, group, torch.float16)  # the library's reader wants in % group == 0
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group))
    w = PackedQuantizationCompressor.decompress(pack(c), scheme)["weight"]
    ref = reference.dequantize(c)
    torch.testing.assert_close(w.float(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


# --- the kernels' layout and the reference ------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_repack_round_trip_is_exact(bits, group, shape):
    c = make_codes(*shape, bits, group)
    kw = repack(c)
    assert kw.qweight.dtype == torch.int32
    assert kw.qweight.shape == (shape[0], -(-shape[1] // TILE) * bits * 16)  # no padding bits
    assert_same_codes(unrepack(kw), c)


@pytest.mark.parametrize("bits", WIDTHS)
def test_reference_dequantize_is_the_direct_formula(bits):
    c = make_codes(5, 200, bits, 64)
    w = reference.dequantize(c)
    for n in range(5):
        for k in range(200):
            g = k // 64
            expect = (int(c.codes[n, k]) - int(c.zeros[n, g])) * float(c.scales[n, g])
            assert float(w[n, k]) == pytest.approx(expect, rel=1e-6, abs=1e-9)


def test_codes_out_of_range_are_refused():
    c = make_codes(4, 64, 4, 32)
    with pytest.raises(ValueError, match="codes"):
        Codes(c.codes + 16, c.scales, c.zeros, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        Codes(c.codes, c.scales, c.zeros, 5, 32)


# --- Triton kernels under the interpreter -------------------------------------------------------

interpreted = pytest.mark.skipif(not INTERPRETING, reason="run in a fresh TRITON_INTERPRET=1 process "
                                 "by test_kernels_under_the_triton_interpreter")


def test_kernels_under_the_triton_interpreter():
    run_interpreted(__file__)


def _kernels():
    """The kernel modules (this process runs with TRITON_INTERPRET=1 from its start)."""
    fix_numpy_scalars()
    from bitalloc.kernels import dispatch, triton_gemm, triton_gemv

    return triton_gemv, triton_gemm, dispatch


def run_kernel(kernel: str, bits: int, group: int, inp: int, m: int, dtype: torch.dtype,
               split_k: int = 1, pair: int = 0):
    gemv, gemm, dispatch = _kernels()
    c = make_codes(33, inp, bits, group, dtype, seed=m)
    kw = repack(c)
    x = torch.randn(m, inp, generator=torch.Generator().manual_seed(m + inp)).to(dtype)
    out = torch.full((m, 33), float("nan"), dtype=dtype)
    consts = dispatch.constants(kw)
    if kernel == "gemv":
        gemv.gemv(x, kw, out, consts, gemv.triton.Config({"BLOCK_N": 16 if pair else 32, "SPLIT": 2,
                                                          "PAIR": pair}))
    else:
        gemm.gemm(x, kw, out, consts, gemm.triton.Config({"BLOCK_N": 32, "SPLIT_K": split_k}))
    return out, reference.linear(x, c)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "an output element was not written"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@interpreted
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("inp", (96, 192))
@pytest.mark.parametrize("m", (1, 3))
@pytest.mark.parametrize("pair", (0, 1))
def test_interpreted_gemv_matches_reference(bits, group, inp, m, pair):
    """PAIR: rows n and n + 16 per program (33 rows: the second program's second half is masked)."""
    out, ref = run_kernel("gemv", bits, group, inp, m, torch.bfloat16, pair=pair)
    assert rel_err(out, ref) < 1e-2  # bf16 output rounding is ~4e-3


@interpreted
@pytest.mark.parametrize("bits", (3, 4))
def test_interpreted_gemv_whole_tiles(bits):
    """K a multiple of 512 takes the unmasked activation path; 3 tiles over 2 strands."""
    out, ref = run_kernel("gemv", bits, 64, 1536, 2, torch.bfloat16)
    assert rel_err(out, ref) < 1e-2


@interpreted
def test_interpreted_gemv_fp16():
    out, ref = run_kernel("gemv", 3, 64, 192, 3, torch.float16)
    assert rel_err(out, ref) < 2e-3


@interpreted
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("inp", (96, 192))
def test_interpreted_gemm_matches_reference(bits, group, inp):
    out, ref = run_kernel("gemm", bits, group, inp, 16, torch.float16)
    assert rel_err(out, ref) < 2e-3


@interpreted
@pytest.mark.parametrize("split_k", (2, 4))
def test_interpreted_split_k_gemm_matches_reference(split_k):
    """3 tiles of K over 2 or 4 splits (one empty): partials summed once, counters back to 0."""
    _, gemm, _ = _kernels()
    out, ref = run_kernel("gemm", 4, 64, 1100, 20, torch.float16, split_k)
    assert rel_err(out, ref) < 2e-3
    assert all(int(locks.abs().sum()) == 0 for _, locks in gemm._SCRATCH.values())


@interpreted
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group", GROUPS)
def test_interpreted_dequantize_kernel_is_exact(bits, group):
    _, gemm, dispatch = _kernels()
    c = make_codes(33, 192, bits, group, torch.float16)
    kw = repack(c)
    w = gemm.dequantize(kw, torch.float32, dispatch.constants(kw))
    assert torch.equal(w, reference.dequantize(c))


# --- QuantLinear and the custom op ---------------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
def test_quant_linear_on_cpu_is_the_reference(bits):
    pytest.importorskip("compressed_tensors")
    from bitalloc.kernels.packing import pack

    c = make_codes(33, 200, bits, 64)
    bias = torch.randn(33).to(torch.bfloat16)
    layer = QuantLinear.from_packed(pack(c), bits, 64, bias=bias)
    x = torch.randn(2, 3, 200).to(torch.bfloat16)
    expect = reference.linear(x.reshape(6, 200), c).view(2, 3, 33) + bias
    assert torch.equal(layer(x), expect)
    assert_same_codes(unrepack(layer.kernel_weight()), c)


def test_quant_linear_state_dict_round_trip():
    c = make_codes(16, 96, 4, 32)
    layer = QuantLinear.from_codes(c)
    fresh = QuantLinear(96, 16, 4, 32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 96).to(torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_custom_op_is_registered_and_compiles_without_graph_breaks():
    layer = QuantLinear.from_codes(make_codes(33, 96, 3, 32))
    x = torch.randn(5, 96).to(torch.bfloat16)
    op = torch.ops.bitalloc.quant_linear.default
    torch.library.opcheck(op, (x, layer.qweight, layer.scale_zero, 3, 32, 96))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
