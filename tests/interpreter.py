"""Helpers for tests that run Triton kernels under the interpreter (a TRITON_INTERPRET=1 process)."""

from __future__ import annotations

import numpy as np


def fix_numpy_scalars() -> None:
    """With numpy >= 2.4 the triton 3.6 interpreter's scalars fail ``int()`` (triton-lang/triton#9171):
    give its tensors an ``__index__`` (the patch tests/test_kernels.py applies for its kernels)."""
    from triton.runtime import interpreter

    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or hasattr(interpreter, "_bitalloc_fix"):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._bitalloc_fix = True
