"""llama.cpp's ggml types: prices against gguf-py's table, bytes against gguf-py and ggml.

Three references, from weakest to strongest:
* gguf-py's dequantizer applied to our bytes gives exactly our dequantized weights (layout and
  arithmetic of every type);
* where gguf-py has a quantizer (Q8_0, Q4_0), its bytes equal ours;
* for the K-quants, whose quantizers gguf-py lacks, our bytes hash to what ggml's own C
  quantizers (``quantize_q*_K`` of llama.cpp's ggml-quants.c, built for x86-64, with and without
  an importance matrix) wrote for the same deterministic input; and when ``BITALLOC_GGML_LIB``
  names a ggml build (e.g. libggml-base.so), the bytes are compared with it directly.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from bitalloc.rounding.kquants import (GGML_TYPES, IMATRIX_TYPES, dequantize, fake_quantize, ggml_type, quantize,
                                       row_allowed, row_bytes)

from .conftest import SHARED

DENSEK = SHARED / "models" / "llama-densek-26m"
BLOCK_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def det_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights that every platform computes identically (integer hashing, then only
    exact or correctly rounded float32 operations), with the corner cases ggml treats specially:
    an all-zero row and sub-block, a lone outlier, constant positive and negative runs."""
    i = np.arange(rows * cols, dtype=np.uint64) + np.uint64(seed << 32)
    h = i * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    u1 = ((h >> np.uint64(40)) & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(2**24)
    u2 = ((h >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(2**24)
    x = (u1 - np.float32(0.5)) * (np.float32(1) + np.float32(16) * (u2 * u2 * u2 * u2)) * np.float32(0.02)
    w = torch.from_numpy(x.reshape(rows, cols))
    w[0] = 0.0
    w[1, :16] = 0.0
    w[1, 40] = 0.75
    w[2, :32] = 0.0125
    w[2, 32:64] = -0.0125
    w[3] = w[3].abs()
    return w


def det_imatrix(cols: int) -> torch.Tensor:
    """A deterministic, uneven importance per input column (some near zero, a few large)."""
    k = np.arange(cols, dtype=np.uint64) * np.uint64(2654435761) % np.uint64(4096)
    u = k.astype(np.float32) / np.float32(4096)
    return torch.from_numpy(u * u * u * np.float32(8) + np.float32(1e-3))


@pytest.fixture(autouse=True)
def one_thread():
    """The searches run thousands of small ops; on a shared 2-core machine intra-op threads only
    wait on each other (one thread is 10-100x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


# ---------------------------------------------------------------- pricing

def test_type_table_matches_gguf_py():
    for name, t in GGML_TYPES.items():
        assert GGML_QUANT_SIZES[gguf_type(name)] == (t.block_size, t.type_size), name
        assert gguf_type(name).value == t.type_id, name
    bpw = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "Q4_0": 4.5,
           "F16": 16, "BF16": 16, "F32": 32}
    assert {n: t.bits_per_weight for n, t in GGML_TYPES.items()} == bpw


def test_row_allowed_and_row_bytes():
    assert row_allowed("Q4_K", 512) and row_allowed("Q4_K", 768)
    assert not row_allowed("Q4_K", 640) and not row_allowed("Q4_K", 0)
    assert row_allowed("Q8_0", 96) and not row_allowed("Q8_0", 100)
    assert row_allowed("F16", 7)
    assert row_bytes("Q6_K", 1536) == 6 * 210 and row_bytes("Q8_0", 64) == 68
    with pytest.raises(ValueError, match="multiple of 256"):
        row_bytes("Q2_K", 100)
    with pytest.raises(ValueError, match="unknown ggml type 'Q7_K'"):
        ggml_type("Q7_K")


@pytest.mark.parametrize("name", K_TYPES)
def test_rows_that_do_not_fill_a_block_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} stores rows in blocks of 256 weights; a row of 320 weights"):
        quantize(torch.randn(4, 320), name)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize(torch.randn(256), "Q4_K")
    with pytest.raises(ValueError, match=r"importance matrix has shape \(512,\), expected \(256,\)"):
        quantize(torch.randn(2, 256), "Q4_K", imatrix=torch.ones(512))
    with pytest.raises(ValueError, match="Q4_0 has no importance-matrix quantizer"):
        quantize(torch.randn(2, 256), "Q4_0", imatrix=torch.ones(256))
    with pytest.raises(ValueError, match="expected uint8"):
        dequantize(torch.zeros(2, 100, dtype=torch.uint8), "Q4_K")


# ---------------------------------------------------------------- bytes and values

def assert_gguf_reads_ours(w: torch.Tensor, name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Our bytes have gguf-py's shape, and gguf-py's dequantization of them is ours, bit for bit."""
    data = quantize(w, name, imatrix)
    assert data.dtype == torch.uint8 and data.shape == (w.shape[0], row_bytes(name, w.shape[1]))
    ours = dequantize(data, name)
    theirs = gguf_dequantize(data.numpy(), gguf_type(name))
    assert theirs.shape == tuple(w.shape)
    assert np.array_equal(ours.numpy().view(np.uint32), theirs.view(np.uint32))  # same bits, -0.0 included
    assert torch.equal(fake_quantize(w, name, imatrix), ours)
    return data


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_gguf_py_dequantizes_our_bytes_exactly(name):
    w = det_weights(8, 512, seed=1)
    assert_gguf_reads_ours(w, name)
    if name in IMATRIX_TYPES:
        assert_gguf_reads_ours(w, name, det_imatrix(512))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_bytes_equal_gguf_py_quantizer(name):
    w = det_weights(8, 512, seed=2)
    assert np.array_equal(quantize(w, name).numpy(), gguf_quantize(w.numpy(), gguf_type(name)))


def test_plain_types_round_trip():
    w = det_weights(4, 64, seed=3)
    for name in ("F32", "F16", "BF16"):
        assert_gguf_reads_ours(w, name)
    assert torch.equal(fake_quantize(w, "F32"), w)
    assert torch.equal(fake_quantize(w, "BF16"), w.bfloat16().float())


# sha256 of the bytes that ggml's C quantizers (llama.cpp ggml-quants.c as vendored by
# llama-cpp-python 0.3.36, gcc -O2, x86-64) wrote for det_weights(16, 512, seed=7), without and with
# det_imatrix(512)
GGML_SHA256 = {
    ("Q2_K", False): "bb3d0951fe95ec28efe9c57ecf80bf12474242f714bbaaf4c3c7ce084bec5351",
    ("Q3_K", False): "8238bccffb3b42aa5627c3dc03d0126ec94c1cffe1e1d1d150103c496bc51321",
    ("Q4_K", False): "d86c6da510fe39d36ad33c50445a479fae3d528ba36234908609e06af0245ed3",
    ("Q5_K", False): "ce4ec1c2df7aead8bf13c683ee99dc396a78a53535c48c446fd068242f19008d",
    ("Q6_K", False): "41a7590263debfb21b8c4cd1df37f5f83a61421470565b414b614ef747956be4",
    ("Q2_K", True): "9650c4254f1b223d99873411692f2fece9b072646ce35ec52b382586f1741203",
    ("Q3_K", True): "a686ec7a1371881cfa8cc3a01fbbf550e4ba5cd092c022a6a0bb22230d8afc18",
    ("Q4_K", True): "62400273077ac29193f5a31449f9bd51af558c2396403e586485f0860fd14708",
    ("Q5_K", True): "5f31167917bb676b550c909be7237cbd1e2a60d0b7de261a254f07d7dfda7765",
    ("Q6_K", True): "6696ba32bcb938e043bf9e966c68f118dfacb48ca45e7ec5cce37cb082551b59",
}


@pytest.mark.parametrize("name,with_imatrix", list(GGML_SHA256))
def test_bytes_equal_ggml_reference(name, with_imatrix):
    w = det_weights(16, 512, seed=7)
    data = quantize(w, name, det_imatrix(512) if with_imatrix else None)
    assert hashlib.sha256(data.numpy().tobytes()).hexdigest() == GGML_SHA256[name, with_imatrix]


def ggml_quantize(lib: ctypes.CDLL, w: torch.Tensor, name: str, imatrix: torch.Tensor | None) -> np.ndarray:
    """Bytes from ggml's own ``quantize_<type>`` (exported by libggml-base)."""
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    out = np.zeros((w.shape[0], row_bytes(name, w.shape[1])), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    fn = getattr(lib, "quantize_" + name.lower().replace("_k", "_K"))
    fn.restype = ctypes.c_size_t
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(w.shape[0]),
       ctypes.c_int64(w.shape[1]), None if qw is None else qw.ctypes.data_as(ctypes.c_void_p))
    return out


def real_tensor(name: str = "model.layers.2.self_attn.k_proj.weight") -> torch.Tensor:
    from safetensors import safe_open

    shard = json.loads((DENSEK / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(DENSEK / shard), "pt") as f:
        return f.get_tensor(name).float()


@pytest.mark.skipif(not os.environ.get("BITALLOC_GGML_LIB"),
                    reason="set BITALLOC_GGML_LIB to a ggml library (libggml-base.so) to compare with ggml directly")
@pytest.mark.parametrize("name", K_TYPES + ["Q8_0", "Q4_0"])
def test_bytes_equal_ggml_library(name):
    lib = ctypes.CDLL(os.environ["BITALLOC_GGML_LIB"])
    inputs = [det_weights(32, 512, 11), det_weights(32, 512, 12) * 31]  # also weights of another scale
    if DENSEK.is_dir():
        inputs.append(real_tensor())
    for w in inputs:
        for im in (None, det_imatrix(512)) if name in K_TYPES else (None,):
            assert np.array_equal(quantize(w, name, im).numpy(), ggml_quantize(lib, w, name, im)), im is None


# ---------------------------------------------------------------- behaviour

def test_error_falls_with_width():
    w = det_weights(16, 1024, seed=5)[4:]
    mse = [float((fake_quantize(w, n) - w).pow(2).mean()) for n in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert mse == sorted(mse, reverse=True) and len(set(mse)) == len(mse)
    assert mse[-1] < mse[0] / 1000


def test_imatrix_moves_error_to_unimportant_columns():
    w = det_weights(16, 512, seed=6)[4:]
    im = torch.ones(512)
    im[::2] = 100.0  # even columns matter 100x more
    for name in ["Q2_K", "Q3_K", "Q4_K"]:
        plain = (fake_quantize(w, name) - w).pow(2)
        weighted = (fake_quantize(w, name, im) - w).pow(2)
        assert weighted[:, ::2].sum() < plain[:, ::2].sum(), name


def test_passes_over_rows_do_not_change_the_bytes(monkeypatch):
    from bitalloc.rounding import kquants

    w = det_weights(6, 512, seed=9)
    im = det_imatrix(512)
    whole = {n: quantize(w, n, im) for n in ["Q4_K", "Q6_K"]}
    monkeypatch.setattr(kquants, "_CHUNK", 2)  # one row per pass
    assert all(torch.equal(quantize(w, n, im), b) for n, b in whole.items())


def test_dtype_and_device_independence():
    w = det_weights(4, 256, seed=8)
    assert torch.equal(quantize(w.bfloat16(), "Q4_K"), quantize(w.bfloat16().float(), "Q4_K"))
    assert torch.equal(quantize(w.double(), "Q6_K"), quantize(w, "Q6_K"))  # converted to float32 first, as ggml does


@pytest.mark.skipif(not DENSEK.is_dir(), reason=f"reference checkpoint {DENSEK} is absent")
def test_real_tensor():
    w = real_tensor()
    assert w.shape == (128, 512)
    mse = []
    for n in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]:
        assert_gguf_reads_ours(w, n)
        mse.append(float((fake_quantize(w, n) - w).pow(2).mean()))
    assert mse == sorted(mse, reverse=True)
    for n in ["Q8_0", "Q4_0"]:
        assert np.array_equal(quantize(w, n).numpy(), gguf_quantize(w.numpy(), gguf_type(n)))
    assert_gguf_reads_ours(w, "Q4_K", det_imatrix(512))
