"""The package's layers, checked over the AST (imports inside functions count too).

import-linter's ``layers``, ``independence`` and acyclic contracts, without the dependency: a
module imports only its own layer or layers below it; ``stores`` and ``sources`` never import
each other; no import circle among the package's modules, at any depth. ``jasper_mmap/__init__``
(the public facade) stands above every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jasper_mmap"

#: bottom-up; a layer may import itself and every layer before it
LAYERS = [
    {"errors", "_version", "steering"},
    {"_fs"},
    {"format"},
    {"stores", "sources"},
    {"remote"},
    {"converters"},
    {"dataset"},
    {"loading"},
    {"cli", "synthetic"},
]
INDEPENDENT = ({"stores"}, {"sources"})


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ("jasper_mmap", *p.relative_to(PKG).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            cands = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in cands if c in mods and c != name}
    return found


def _layer(name: str) -> int | None:
    top = name.split(".")[1] if "." in name else None
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_every_module_has_a_layer():
    orphans = [m for m in _modules() if m != "jasper_mmap" and _layer(m) is None]
    assert not orphans, f"modules in no layer (add their package to LAYERS): {orphans}"


def test_imports_point_down():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        for dep in _imports(name, path, mods):
            if name != "jasper_mmap" and dep != "jasper_mmap" and _layer(dep) > _layer(name):
                bad.append(f"{name} -> {dep}")
            if dep == "jasper_mmap" and name != "jasper_mmap":
                bad.append(f"{name} -> jasper_mmap (the package's __init__)")
    assert not bad, "imports that point up a layer:\n  " + "\n  ".join(sorted(bad))


def test_stores_and_sources_are_independent():
    mods = _modules()
    bad = [
        f"{n} -> {d}"
        for n, p in mods.items()
        for d in _imports(n, p, mods)
        for a, b in (INDEPENDENT, INDEPENDENT[::-1])
        if n.split(".")[1:2] and n.split(".")[1] in a and d.split(".")[1:2] and d.split(".")[1] in b
    ]
    assert not bad, "stores and sources import each other:\n  " + "\n  ".join(sorted(bad))


def test_no_import_circles():
    mods = _modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, (
        "import circles (modules that import each other, at any depth):\n"
        + "\n".join(
            "  among "
            + ", ".join(c)
            + "\n    "
            + "\n    ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
            for c in cycles
        )
    )
