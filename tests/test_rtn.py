import pytest
import torch

from bitalloc.rounding import rtn_dequantize, rtn_error


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_on_the_grid_are_unchanged(bits):
    g = torch.Generator().manual_seed(bits)
    qmax = 2**bits - 1
    q = torch.randint(0, qmax + 1, (8, 256), generator=g).float()
    q[:, ::128] = 0  # every group spans the full code range, so min/max pin the grid
    q[:, 1::128] = qmax
    scale, zero = 0.125, 3.0  # exactly representable in fp16
    w = (q - zero) * scale
    assert torch.equal(rtn_dequantize(w, bits, 128), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols", [128, 200, 64])
def test_error_is_at_most_half_a_step(bits, cols):
    w = torch.randn(16, cols, generator=torch.Generator().manual_seed(cols))
    dw = rtn_error(w, bits, 128)
    assert dw.shape == w.shape
    groups = [w[:, i:i + 128] for i in range(0, cols, 128)]
    step = max(float((x.amax(1) - x.amin(1)).max()) for x in groups) / (2**bits - 1)
    assert float(dw.abs().max()) <= step * 0.5 + step * 1e-2 + 1e-6  # fp16 scale rounding


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [float(rtn_error(w, b, 128).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    # uniform-noise theory: each extra bit divides the squared error by ~4
    assert 3.0 < errs[1] / errs[2] < 5.5


def test_symmetric_keeps_zero_exact():
    w = torch.randn(4, 128)
    w[:, 5] = 0.0
    assert torch.all(rtn_dequantize(w, 4, 128, symmetric=True)[:, 5] == 0)
