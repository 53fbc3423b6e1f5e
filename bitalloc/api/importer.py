"""Read another quantizer's config into a plan (bits per tensor), to compare or re-budget it.

The imported plan prices every tensor exactly as bitalloc does, so its ``achieved_bpp`` is the
honest size of that quantization; with a score file its predicted error is filled in too.
Modules the config excludes become locked entries (``reason: excluded by the imported config``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..allocator import greedy_marginal
from ..budget import Budget, tensor_bits
from ..errors import PlanError
from ..export import detect
from ..model.checkpoint import Checkpoint
from ..model.inventory import build_inventory
from ..plan import Plan
from ..sensitivity.table import ErrorTable
from .allocate import build_plan
from .config import SolveConfig
from .context import ModelContext


def import_config(path: str | Path, model: str | Path, scores: Optional[str | Path] = None) -> Plan:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {p}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PlanError(f"{p} is not valid JSON") from None
    fmt, config, resolve = detect(doc)
    ckpt = Checkpoint(model)
    inv = build_inventory(ckpt)
    choices = {u.tensor: resolve(config, u.module, u.shape[-1]) for u in inv.quantized}
    units = [u if u.locked or choices[u.tensor] is not None else
             dataclasses.replace(u, locked=True, reason="excluded by the imported config") for u in inv.units]
    inv = dataclasses.replace(inv, units=units)
    quantized = inv.quantized
    if not quantized:
        raise PlanError(f"{p} quantizes no tensor of {ckpt.path}")
    by_name = {u.tensor: choices[u.tensor] for u in quantized}
    candidates = sorted(set(by_name.values()), key=lambda c: (c.bits, c.group_size, c.symmetric))
    inv.tie_groups = [g for g in inv.tie_groups if all(m in by_name for m in g.members)
                      and len({by_name[m] for m in g.members}) == 1]
    allowed = np.array([[c == by_name[u.tensor] for c in candidates] for u in quantized])
    table = _table(scores, ckpt, candidates)
    # price the imported choices exactly, then "solve" the problem that allows only them
    exact_bits = sum(tensor_bits(*_matrix(u.shape), by_name[u.tensor].bits, by_name[u.tensor].group_size,
                                 by_name[u.tensor].symmetric) for u in quantized)
    budget = Budget(exact_bits / 8, "bytes", f"{exact_bits / 8:.0f}B (as imported)")
    ctx = ModelContext.from_inventory(ckpt, inv, candidates, SolveConfig(), allowed)
    problem = ctx.with_table(ctx.problem(budget), table)
    a = dataclasses.replace(greedy_marginal(problem), solver=f"imported:{fmt}", status="imported")
    return build_plan(ctx, problem, a, table, budget)


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(np.prod(shape[:-1])), int(shape[-1])


def _table(scores: Optional[str | Path], ckpt: Checkpoint, candidates) -> ErrorTable:
    """The score file to take predicted errors from, or an empty table when none is given."""
    if scores is not None:
        t = ErrorTable.load(scores)
        t.check_matches(ckpt.config_sha256, ckpt.index_sha256, list(candidates), [])
        return t
    return ErrorTable.empty(list(candidates))
