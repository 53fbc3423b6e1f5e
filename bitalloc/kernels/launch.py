"""Eager launches without triton's per-call Python: a compiled kernel kept per call signature.

Why: triton's own launch path (the autotuner's key and config lookup, binding and specialising
every argument, the compiled-kernel cache lookup) costs about 30 us of Python per call, more than a
decode GEMV runs on the GPU, so eager decoding was launch-bound (docs/kernels.md). The first call
of a signature goes through triton as usual (compiling and autotuning); its ``CompiledKernel``
and grid are kept here, and later calls hand only the arguments to its C launcher.

A compiled kernel is valid for exactly the argument properties triton specialised it on: integer
arguments equal to 1 or divisible by 16 (here all functions of the shapes and strides, which are
in the key) and pointers aligned to 16 bytes (checked per call: a misaligned view goes through
triton's path, which compiles the variant it needs). Under the interpreter (CPU tests) triton
returns no compiled kernel and nothing is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from triton.runtime import driver


@dataclass(frozen=True)
class Launch:
    """One compiled kernel with its grid and its compile-time arguments (ignored by the launcher,
    but positional: the launcher takes every parameter of the kernel in order)."""

    kernel: Any  # triton.compiler.CompiledKernel
    grid: tuple[int, int, int]
    constexprs: tuple[Any, ...]

    def __call__(self, *args: Any) -> None:
        k = self.kernel
        stream = driver.active.get_current_stream(args[0].device.index)
        k.run(*self.grid, stream, k.function, k.packed_metadata, None, None, None,
              *args, *self.constexprs)


def bind(compiled: Any, fn: Any, grid: tuple[int, ...], runtime: int,
         kwargs: dict[str, Any]) -> Launch | None:
    """A ``Launch`` for ``compiled`` (what ``fn[grid](...)`` returned), whose first ``runtime``
    parameters are passed per call and the rest taken from ``kwargs``; None under the interpreter."""
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return None
    names = fn.arg_names[runtime:]
    grid3 = (tuple(grid) + (1, 1))[:3]
    return Launch(compiled, grid3, tuple(kwargs[n] for n in names))


def run(fn: Any, tuned: Any, grid: Callable[[dict], tuple[int, ...]], args: tuple, meta: dict[str, Any],
        config: Any = None, warmup: bool = False) -> Launch | None:
    """Launch ``fn`` (``tuned``: its autotuner) through triton and bind the compiled kernel for later calls.

    ``config`` pins one configuration (tests, the interpreter), None autotunes; ``warmup`` compiles every
    configuration without launching. ``grid`` maps the chosen configuration's values to the grid.
    """
    kernel, pinned = (tuned, {}) if config is None else (fn, config.all_kwargs())
    meta = {**pinned, **meta}
    if warmup:
        kernel.warmup(*args, **meta, grid=(1,))
        return None
    compiled = kernel[grid](*args, **meta)
    chosen = {**(config or tuned.best_config).all_kwargs(), **meta}
    return bind(compiled, fn, grid(chosen), len(args), chosen)


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor starts on a 16-byte boundary (what triton assumed when compiling)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)
