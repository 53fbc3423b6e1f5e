"""The calibration pass under torchrun: 2 gloo processes on CPU give the single-process table.

Launched exactly as a user would (``torchrun --nproc-per-node 2 $(which bitalloc) scores ...``),
through ``torch.distributed.run``; only rank 0 writes. Every score must agree with the
single-process table to 1e-4 relative (sums over sequences are taken in another order, so the
last bits may differ), on a dense model and on an MoE model whose experts see different tokens
on each rank.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitalloc.sensitivity.table import ErrorTable, max_relative_difference

ARGS = ("--calib-tokens", "768", "--seqlen", "128", "--device", "cpu", "-q")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bitalloc(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bitalloc.cli import main; main()", *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    # torchrun runs a script; "-c" is not one, so run the console entry point's module instead
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "bitalloc.cli", *args]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_moe"])
def test_two_gloo_ranks_give_the_single_process_table(model, calib_file, tmp_path, request):
    path = request.getfixturevalue(model)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    r1 = subprocess.run(_bitalloc("scores", str(path), "--calib", str(calib_file), "-o", str(one), *ARGS),
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run(_torchrun(2, "scores", str(path), "--calib", str(calib_file), "-o", str(two), *ARGS),
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = ErrorTable.load(one), ErrorTable.load(two)
    assert a.tensors == b.tensors and sorted(a.scores) == sorted(b.scores)
    diffs = max_relative_difference(a, b)
    assert max(diffs.values()) < 1e-4, diffs
    assert not np.array_equal(a.tokens, np.zeros_like(a.tokens))
    np.testing.assert_array_equal(a.tokens, b.tokens)  # routed-token counts add up exactly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


def test_a_failing_rank_ends_the_run_with_one_error(tiny_llama, calib_file, tmp_path):
    """A user error on every rank: exit non-zero, the error line shown, nothing written."""
    out = tmp_path / "s.safetensors"
    r = subprocess.run(_torchrun(2, "scores", str(tiny_llama), "--calib", str(calib_file), "-o", str(out),
                                 "--calib-tokens", "768", "--seqlen", "100000", "--device", "cpu", "-q"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "error: --calib-tokens 768 is less than one window of --seqlen 100000" in r.stderr
    assert not out.exists()
