import pytest

from bitalloc.budget import nominal_bpp, parse_budget, tensor_bits
from bitalloc.errors import BudgetError


@pytest.mark.parametrize("text,value,unit", [
    ("2.5bpp", 2.5, "bpp"), ("2.5", 2.5, "bpp"), ("3", 3.0, "bpp"), (" 2.25 BPP ", 2.25, "bpp"),
    ("900MB", 900e6, "bytes"), ("3GiB", 3 * 2**30, "bytes"), ("512 KiB", 512 * 1024, "bytes"), ("10B", 10, "bytes"),
])
def test_parse_budget(text, value, unit):
    b = parse_budget(text)
    assert b.unit == unit and b.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "2.5 bits", "-1", "0bpp", "40bpp", "1.2.3", "5 parsecs"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_bit_accounting_counts_scale_and_zero():
    # compressed-tensors storage: fp16 scale + zero point at the code width per group (symmetric: no zero)
    assert nominal_bpp(2, 128) == 2 + 18 / 128 and nominal_bpp(4, 128) == 4.15625 and nominal_bpp(3, 64) == 3 + 19 / 64
    assert nominal_bpp(3, 128) == 3.1484375 and nominal_bpp(8, 128) == 8.1875 and nominal_bpp(4, 128, True) == 4.125
    assert tensor_bits(384, 1024, 3, 128) == 384 * 1024 * 3 + 384 * 8 * 19
    assert tensor_bits(384, 1024, 3, 128, symmetric=True) == 384 * 1024 * 3 + 384 * 8 * 16
    # a short last group still stores a full scale and zero
    assert tensor_bits(2, 130, 4, 128) == 2 * 130 * 4 + 2 * 2 * 20


def test_budget_totals():
    assert parse_budget("2.5").total_bits(1000) == 2500
    assert parse_budget("1kB").total_bits(10**9) == 8000
