"""Helpers for tests that run Triton kernels under the interpreter (a TRITON_INTERPRET=1 process)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str) -> None:
    """Run ``test_file``'s tests marked ``interpreted`` (by name) in a fresh TRITON_INTERPRET=1 process.

    Why a fresh process: the variable must be set before Triton is first imported, and other tests of
    the session import it (through transformers and compressed-tensors) without it.
    """
    if INTERPRETING:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
                          "-k", "interpreted"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout and " skipped" not in run.stdout


def fix_numpy_scalars() -> None:
    """With numpy >= 2.4 the triton 3.6 interpreter's scalars fail ``int()`` (triton-lang/triton#9171):
    give its tensors an ``__index__``."""
    from triton.runtime import interpreter

    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or hasattr(interpreter, "_bitalloc_fix"):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._bitalloc_fix = True
