"""Solver time and optimality gap on synthetic error tables, from 10^3 to 10^6 units.

    python benchmarks/solver_scaling.py            # prints a markdown table, writes benchmarks/out/scaling.json

Error tables follow the high-resolution law that measured tables follow, with noise:
e_ic = c_i * n_i * 4^(-bits_c) * U(0.9, 1.1), sensitivities c_i log-normal (sigma 1.5, i.e. about
three decades, as on the reference models) times a smooth depth profile. Six candidates
{2,3,4,5,6,8} x g128. Shapes come from real architectures: random Llama-70B linears for the
generic sizes, the full 70B inventory (80 layers x 7, q/k/v and gate/up tied), and a
DeepSeek-V3-sized MoE (61 layers x 256 experts x 3, gate/up tied per expert).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from bitalloc.allocator import build_problem, solve, water_fill
from bitalloc.budget import parse_budget
from bitalloc.plan import Candidate

CANDIDATES = [Candidate(bits=b, group_size=128) for b in (2, 3, 4, 5, 6, 8)]
LLAMA70B = {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192), "o": (8192, 8192),
            "gate": (28672, 8192), "up": (28672, 8192), "down": (8192, 28672)}
BUDGET = "3.3"


def errors_for(shapes: list[tuple[int, int]], depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = np.array([r * c for r, c in shapes], dtype=np.float64)
    c = rng.lognormal(0, 1.5, len(shapes)) * (1 + 2 * np.exp(-8 * depth) + np.exp(-8 * (1 - depth)))
    law = 4.0 ** -np.array([x.bits for x in CANDIDATES], dtype=np.float64)
    return c[:, None] * n[:, None] * law[None, :] * rng.uniform(0.9, 1.1, (len(shapes), len(CANDIDATES)))


def generic(n_units: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kinds = list(LLAMA70B.values())
    shapes = [kinds[k] for k in rng.integers(0, len(kinds), n_units)]
    return [f"u{i}" for i in range(n_units)], shapes, errors_for(shapes, rng.random(n_units), rng), []


def llama70b(seed: int = 0):
    rng = np.random.default_rng(seed)
    names, shapes, depth, ties = [], [], [], []
    for layer in range(80):
        for role, shape in LLAMA70B.items():
            names.append(f"layers.{layer}.{role}")
            shapes.append(shape)
            depth.append(layer / 79)
        ties += [[f"layers.{layer}.{r}" for r in ("q", "k", "v")], [f"layers.{layer}.{r}" for r in ("gate", "up")]]
    return names, shapes, errors_for(shapes, np.array(depth), rng), ties


def moe671b(seed: int = 0):
    rng = np.random.default_rng(seed)
    names, shapes, depth, ties = [], [], [], []
    for layer in range(61):
        for e in range(256):
            base = f"layers.{layer}.experts.{e}"
            for role, shape in (("gate", (2048, 7168)), ("up", (2048, 7168)), ("down", (7168, 2048))):
                names.append(f"{base}.{role}")
                shapes.append(shape)
                depth.append(layer / 60)
            ties.append([f"{base}.gate", f"{base}.up"])
    return names, shapes, errors_for(shapes, np.array(depth), rng), ties


def run(label: str, instance, solvers) -> list[dict]:
    names, shapes, errors, ties = instance
    t0 = time.perf_counter()
    problem = build_problem(names, shapes, errors, CANDIDATES, ties, parse_budget(BUDGET))
    build_s = time.perf_counter() - t0
    rows = []
    for solver in solvers:
        t0 = time.perf_counter()
        a = solve(problem, solver, time_limit_s=120)
        rows.append({"instance": label, "units": len(names), "groups": problem.num_groups, "solver": a.solver,
                     "status": a.status, "gap": a.gap, "seconds": time.perf_counter() - t0, "build_s": build_s,
                     "achieved_bpp": problem.total_bits(a.choice) / problem.counted_params})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def closed_form_million(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = rng.choice([8192 * 8192, 1024 * 8192, 28672 * 8192], 1_000_000).astype(np.float64)
    c = rng.lognormal(0, 1.5, 1_000_000)
    t0 = time.perf_counter()
    wf = water_fill(c, n, 3.05 * float(n.sum()), 2.0, 8.0)
    seconds = time.perf_counter() - t0
    row = {"instance": "closed form, continuous", "units": 1_000_000, "groups": 1_000_000, "solver": "water-fill",
           "status": "optimal", "gap": 0.0, "seconds": seconds,
           "achieved_bpp": float(n @ wf.bits / n.sum()) + 0.25}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    rows = []
    rows += run("synthetic 10^3", generic(1_000), ["ilp", "lagrangian", "closed-form"])
    rows += run("synthetic 10^4", generic(10_000), ["ilp", "lagrangian", "closed-form"])
    rows += run("synthetic 10^5", generic(100_000), ["ilp", "lagrangian"])
    rows += run("Llama-70B inventory", llama70b(), ["ilp", "lagrangian", "closed-form", "greedy"])
    rows += run("671B-MoE expert inventory", moe671b(), ["ilp", "lagrangian", "closed-form"])
    rows.append(closed_form_million())
    out = Path("benchmarks/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))
    print("\n| instance | units | groups | solver | status | gap | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "-" if r["gap"] is None else f"{r['gap']:.1e}"
        print(f"| {r['instance']} | {r['units']:,} | {r['groups']:,} | {r['solver']} | {r['status']} | {gap} | "
              f"{r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
