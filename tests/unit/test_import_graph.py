"""The package's import graph: no module of ``lane_ray`` imports, directly or through others, a module that
imports it back, counting imports inside functions too (a lazy import hides a cycle; it does not remove it), and
no module imports a private name of another."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str) -> dict[str, Path]:
    mods = {}
    for p in (ROOT / package).rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_no_import_cycle_in_the_package():
    mods = _modules("lane_ray")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for n in _imports(p):
            if isinstance(n, ast.ImportFrom):
                names = [n.module or ""] + [f"{n.module}.{a.name}" for a in n.names]
            else:
                names = [a.name for a in n.names]
            graph[m] |= {t for t in names if t in mods and t != m}

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            v, path = stack.pop()
            for w in graph[v]:
                if w == goal:
                    return path + [w]
                if w not in seen:
                    seen.add(w)
                    stack.append((w, path + [w]))
        return None

    cycles = [c for m in sorted(mods) if (c := reaches(m, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_private_name_is_imported_across_modules():
    found = []
    for package in ("lane_ray", "serve", "jobs", "tests", "benchmarks"):
        for m, p in _modules(package).items():
            for n in _imports(p):
                if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in {"lane_ray", "serve", "jobs"}:
                    found += [f"{m}: from {n.module} import {a.name}" for a in n.names if a.name.startswith("_")]
    assert not found, found
