"""The package's shape and its one-way data flow, read from the source (every import, lazy ones included).

model + text -> sensitivity -> allocator -> plan -> rounding -> checkpoint -> kernels. The rules are
data (``RULES``), checked by :func:`violations`, which the last tests run on a copy of the package with
a forbidden import planted, so a rule that could never fire is caught too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bitalloc"
TOP_LEVEL = {"__init__", "cli", "errors", "progress", "plan", "budget"}
PACKAGES = {"api", "model", "sensitivity", "allocator", "rounding", "kernels", "export", "report"}

# (what the rule covers, which imports it forbids or allows, why)
RULES: list[tuple[str, str, set[str], str]] = [
    ("allocator", "forbid", {"bitalloc.model", "bitalloc.sensitivity", "bitalloc.rounding", "torch"},
     "the solvers work on plain arrays and never pay for torch"),
    ("kernels", "allow", {"bitalloc.kernels"}, "kernels stand alone: packing, Triton and their torch reference"),
    ("plan", "allow", {"bitalloc.errors", "bitalloc.budget"}, "the plan is pure data with its bit accounting"),
    ("budget", "allow", {"bitalloc.errors"}, "bit accounting is pure arithmetic"),
    ("rounding", "forbid", {"bitalloc.sensitivity", "bitalloc.allocator"}, "rounding follows a plan, it does not make one"),
    ("cli", "allow", {"bitalloc.api", "bitalloc.plan", "bitalloc.export", "bitalloc.report", "bitalloc.errors",
                      "bitalloc.progress"}, "the CLI is a thin layer over the API"),
    ("export", "allow", {"bitalloc.export", "bitalloc.plan", "bitalloc.errors", "bitalloc.model.gguf_names"},
     "exporters read plans only (and name tensors as GGUF does)"),
    ("model", "allow", {"bitalloc.model", "bitalloc.plan", "bitalloc.budget", "bitalloc.errors"},
     "the model layer comes first: it reads checkpoints and depends on no later stage"),
    ("model.gguf_names", "allow", {"bitalloc.errors"}, "GGUF tensor names are pure data the exporters may read"),
]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from x import y`` counts x and x.y)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _covered(module: str, subject: str) -> bool:
    target = f"bitalloc.{subject}"
    return module == target or module.startswith(target + ".")


def _matches(imported: str, prefix: str) -> bool:
    return imported == prefix or imported.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as 'module imports name (why)'."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        imported = imports_of(path, root)
        for subject, kind, names, why in RULES:
            if not _covered(module, subject):
                continue
            for imp in sorted(imported):
                if kind == "forbid" and any(_matches(imp, n) for n in names):
                    found.append(f"{module} imports {imp} ({why})")
                if kind == "allow" and _matches(imp, "bitalloc") and imp != "bitalloc" \
                        and not any(_matches(imp, n) for n in names):
                    found.append(f"{module} imports {imp} ({why})")
    return found


def test_every_import_follows_the_data_flow():
    assert violations(PACKAGE) == []


def test_top_level_holds_only_the_entry_points_and_pure_data():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules <= TOP_LEVEL, f"move {sorted(modules - TOP_LEVEL)} into a package"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= PACKAGES, f"unexpected packages {sorted(packages - PACKAGES)}"


@pytest.mark.parametrize("module", ["bitalloc.plan", "bitalloc.budget", "bitalloc.allocator", "bitalloc.export",
                                    "bitalloc.api", "bitalloc.sensitivity.table"])
def test_resolve_path_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"importing {module} pulls in torch {r.stderr}"


@pytest.mark.parametrize("victim, line, expected", [
    ("allocator/exact.py", "import torch", "bitalloc.allocator.exact imports torch"),
    ("allocator/solve.py", "from ..model import inventory", "bitalloc.allocator.solve imports bitalloc.model"),
    ("kernels/__init__.py", "from ..plan import Plan", "bitalloc.kernels imports bitalloc.plan"),
    ("plan.py", "from .progress import SILENT", "bitalloc.plan imports bitalloc.progress"),
    ("rounding/rtn.py", "from ..sensitivity import table", "bitalloc.rounding.rtn imports bitalloc.sensitivity"),
    ("cli.py", "def f():\n    from .sensitivity.collect import measure_errors",
     "bitalloc.cli imports bitalloc.sensitivity.collect"),
    ("export/torchao.py", "from ..model.checkpoint import Checkpoint", "bitalloc.export.torchao imports bitalloc.model"),
    ("model/gguf.py", "from ..export.llamacpp import export", "bitalloc.model.gguf imports bitalloc.export"),
    ("model/gguf_names.py", "from .checkpoint import Checkpoint", "bitalloc.model.gguf_names imports bitalloc.model"),
])
def test_a_planted_forbidden_import_is_caught(tmp_path, victim, line, expected):
    copy = tmp_path / "bitalloc"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / victim
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((target.read_text() if target.exists() else "") + "\n" + line + "\n")
    assert any(v.startswith(expected) for v in violations(copy)), violations(copy)


def test_a_stray_top_level_module_is_caught(tmp_path, monkeypatch):
    copy = tmp_path / "bitalloc"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "units.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    with pytest.raises(AssertionError, match="units"):
        test_top_level_holds_only_the_entry_points_and_pure_data()
