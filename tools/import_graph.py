#!/usr/bin/env python3
"""The import graph of a package, read statically: its size, the most imported modules, and any cycle.

    python tools/import_graph.py [mmfm]     (run by `make style`; tests/test_import_graph.py checks the same)

Every `import` and `from ... import` in the package's .py files counts (subpackages included, relative imports
resolved, nbdev's `_modidx.py` skipped, as it only indexes names), also those inside a function: an import
deferred to dodge a cycle is still a cycle in the design. An import of `a.b.c` is an edge to the most specific
module of the package it names (`from mmfm import codec` is an edge to `mmfm.codec`); the parent packages'
`__init__` run too, but an edge to each would make every module depend on its package.
`importlib.import_module(...)` is not seen.

Exits 1 on a cycle, and on a module outside `<package>/examples/` that imports from `<package>.examples` (the
library must not depend on its worked examples).
"""
import ast, sys
from collections import defaultdict
from pathlib import Path

def module_names(pkg_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for the package's .py files; folders count as (namespace) packages too, so
    an import of one is recognised even without an `__init__.py`."""
    pkg_dir = Path(pkg_dir)
    mods = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        rel = f.relative_to(pkg_dir)
        if f.name == "_modidx.py" or any(p.startswith((".", "__pycache__")) for p in rel.parts): continue
        parts = [pkg_dir.name, *rel.parent.parts]
        # the packages above it (None: a folder, or its __init__.py is set below)
        for k in range(1, len(parts) + 1): mods.setdefault(".".join(parts[:k]), None)
        mods[".".join(parts if f.name == "__init__.py" else [*parts, f.stem])] = f
    return mods

def _known(name: str, mods) -> str | None:
    "The most specific module of the package that `name` names (`mmfm.codec.Codec` → `mmfm.codec`), if any."
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in mods: return ".".join(parts[:k])
    return None

def imports_of(module: str, path: Path, mods) -> dict[str, list[int]]:
    "{imported module of the package: [line numbers]} for one file."
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]   # what `from .` means in this file
    found = defaultdict(list)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import): targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package): continue   # above the top package: Python would refuse it
                base = ".".join(package[:len(package) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else: base = node.module
            # `from x import y` imports the submodule x.y when there is one, otherwise the name y from x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else: continue
        for t in targets:
            m = _known(t, mods)
            if m is not None and m != module: found[m].append(node.lineno)
    return dict(found)

def import_graph(pkg_dir) -> dict[str, dict[str, list[int]]]:
    "{module: {module it imports: [line numbers]}} over the package's modules (files only)."
    mods = module_names(Path(pkg_dir))
    return {m: imports_of(m, f, mods) for m, f in mods.items() if f is not None}

def cycles(graph) -> list[list[str]]:
    """One cycle (`[a, b, ..., a]`) for each group of modules that import each other (a strongly connected
    component, found with Tarjan's algorithm), so a tangle of many modules is reported once."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, {}):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            comps.append(set(comp))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index: visit(v)
    finally: sys.setrecursionlimit(limit)
    out = []
    for comp in comps:
        if len(comp) == 1 and not any(v in graph.get(v, {}) for v in comp): continue
        out.append(_cycle_in(graph, comp))
    return sorted(out)

def _cycle_in(graph, comp: set) -> list[str]:
    "A shortest cycle through the first module of `comp`, by breadth-first search inside the component."
    start = min(comp)
    prev, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w not in comp: continue
                if w == start:
                    path = [v]
                    while path[-1] != start: path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev: prev[w] = v; nxt.append(w)
        frontier = nxt
    return [start]   # unreachable for a strongly connected component

def example_imports(graph, pkg: str) -> list[str]:
    "'module (line N) imports pkg.examples.x' for each library module that imports from `pkg.examples`."
    ex = f"{pkg}.examples"
    inside = lambda m: m == ex or m.startswith(ex + ".")
    return [f"{m} (line {', '.join(map(str, lines))}) imports {t}"
            for m, deps in sorted(graph.items()) if not inside(m)
            for t, lines in sorted(deps.items()) if inside(t)]

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pkg_dir = Path(argv[0] if argv else "mmfm")
    if not pkg_dir.is_dir(): print(f"{pkg_dir}: not a folder", file=sys.stderr); return 2
    graph, pkg = import_graph(pkg_dir), pkg_dir.resolve().name
    n_edges = sum(len(d) for d in graph.values())
    fan_in = defaultdict(int)
    for deps in graph.values():
        for t in deps: fan_in[t] += 1
    print(f"{pkg}: {len(graph)} modules, {n_edges} imports between them")
    top = lambda d: ", ".join(f"{m} ({n})" for m, n in sorted(d.items(), key=lambda x: (-x[1], x[0]))[:5])
    print(f"most imported: {top(fan_in)}")
    print(f"importing most: {top({m: len(d) for m, d in graph.items()})}")
    found, bad = cycles(graph), example_imports(graph, pkg)
    print(f"cycles: {len(found) or 'none'}")
    for c in found: print("  " + " -> ".join(c))
    print(f"library modules importing {pkg}.examples: {len(bad) or 'none'}")
    for b in bad: print("  " + b)
    return 1 if found or bad else 0

if __name__ == "__main__": sys.exit(main())
