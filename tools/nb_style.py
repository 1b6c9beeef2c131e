#!/usr/bin/env python3
"""Where the notebooks stand on the house style: small exported cells, each followed by its test, short lines.

    python tools/nb_style.py [nbs ...] [--top N]      (also run by `make style`)

Notebooks are found under each folder given (default nbs/), subfolders included; like nbdev, folders
starting with `_` or `.` (`.ipynb_checkpoints`) are skipped. A cell index counts every cell of its notebook
from 0, markdown included (as Jupyter's cell list and tests/test_notebook_hygiene.py do). What is measured:

- exported cells: code cells whose first line is `#| export` or `#| exports`;
- their size: non-blank lines, leaving out `#|` directives; the median, the largest, the share over 30 lines;
- long lines: the share of code lines (non-blank, not directives, in every code cell) over 110 characters
  (this project's limit) and, to compare with the reference, over 100;
- tested within two cells: the share of exported cells whose next one or two code cells (markdown in between
  is passed over; an exported cell ends the look-ahead) are not exported and mention, as a Python name or
  attribute found with `ast`, a name the exported cell defines: a top-level def, class or assigned name, which
  takes in fastcore `@patch`ed functions, whose name is then used as an attribute (`codec.save(...)`);
- the largest exported cells, with notebook and cell index: where splitting a cell pays most.

Reference, from fastcore's and nbdev's own notebooks (the style this project follows): the median exported
cell is 5-6 lines, about 3% of exported cells are over 30 lines, and 4-6% of code lines are over 100
characters. These figures describe; they are not a test (nothing here fails).
"""
import argparse, ast, json, re, statistics, sys
from pathlib import Path

EXPORT = re.compile(r"#\|\s*exports?\b(?!i)")   # `#| export`, `#| exports`; not `#| exporti`
DIRECTIVE = re.compile(r"\s*#\|")
# IPython magics and shell lines (`%time`, `!ls`): not Python, so `ast` can't read them. Column 0 only: an
# indented `%` is more likely a continued `"..." % x`.
MAGIC = re.compile(r"[%!]")
BIG_CELL, LONG_LINE, REF_LINE = 30, 110, 100

def notebooks(root: Path) -> list[Path]:
    "Every notebook under `root`, subfolders too, except in `_`/`.`-prefixed folders (scratch, checkpoints)."
    if root.is_file(): return [root]
    return sorted(p for p in root.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts[:-1]))

def code_lines(src: str) -> list[str]:
    "The lines that count: not blank, not a `#|` directive."
    return [l for l in src.splitlines() if l.strip() and not DIRECTIVE.match(l)]

def is_exported(src: str) -> bool:
    lines = src.splitlines()
    return bool(lines) and bool(EXPORT.match(lines[0]))

def _parse(src: str):
    "The cell's syntax tree, magics blanked out; None if it still is not Python."
    try: return ast.parse("\n".join("" if MAGIC.match(l) else l for l in src.splitlines()))
    except SyntaxError: return None

def _targets(node) -> set[str]:
    if isinstance(node, ast.Name): return {node.id}
    if isinstance(node, (ast.Tuple, ast.List)): return set().union(set(), *map(_targets, node.elts))
    if isinstance(node, ast.Starred): return _targets(node.value)
    return set()   # `obj.attr = ...`, `d[k] = ...` define no new name

def defined_names(src: str) -> set[str]:
    "Names a cell defines at top level: def, class (a `@patch`ed def included), assignment targets."
    tree = _parse(src)
    if tree is None: return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.add(node.name)
        elif isinstance(node, ast.Assign): names |= set().union(*map(_targets, node.targets))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)): names |= _targets(node.target)
    return names

def mentioned_names(src: str) -> set[str]:
    "Names a cell uses: plain names and attributes (a `@patch`ed method is called as `obj.method`)."
    tree = _parse(src)
    if tree is None: return set(re.findall(r"[A-Za-z_]\w*", src))   # not Python: fall back to its identifiers
    return ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)})

def notebook_stats(path: Path, label: str | None = None) -> dict:
    "Per notebook: exported cells as (cell index, lines, tested), and the code lines' lengths."
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    exported, lengths = [], []
    for k, (i, src) in enumerate(code):
        lengths += [len(l) for l in code_lines(src)]
        if not is_exported(src): continue
        names, tested = defined_names(src), False
        for _, nxt in code[k + 1:k + 3]:
            if is_exported(nxt): break
            if names & mentioned_names(nxt): tested = True; break
        exported.append((i, len(code_lines(src)), tested))
    return dict(name=label or path.name, exported=exported, lengths=lengths)

def pct(n: int, d: int) -> str: return f"{100 * n / d:.1f}% ({n} of {d})" if d else "n/a (none)"

def report(paths: list[Path], top: int = 5, labels: list[str] | None = None, out=sys.stdout) -> None:
    "Print the figures for these notebooks, named by `labels` (their paths under the folder given) if given."
    stats = [notebook_stats(p, l) for p, l in zip(paths, labels or [None] * len(paths))]
    cells = [(s["name"], i, n, t) for s in stats for i, n, t in s["exported"]]
    sizes = [n for _, _, n, _ in cells]
    lengths = [l for s in stats for l in s["lengths"]]
    p = lambda *a: print(*a, file=out)
    p(f"notebooks: {len(paths)}; exported cells: {len(cells)}")
    if not cells: return
    p(f"exported-cell lines (non-blank, no #| directives): median {statistics.median(sizes):g}, "
      f"max {max(sizes)}   [reference: median 5-6]")
    p(f"exported cells over {BIG_CELL} lines: {pct(sum(n > BIG_CELL for n in sizes), len(sizes))}"
      "   [reference: ~3%]")
    over = lambda limit: pct(sum(l > limit for l in lengths), len(lengths))
    p(f"code lines over {LONG_LINE} characters: {over(LONG_LINE)}; over {REF_LINE}: {over(REF_LINE)}"
      f"   [reference: 4-6% over {REF_LINE}]")
    p(f"exported cells tested within two cells: {pct(sum(t for *_, t in cells), len(cells))}")
    p("")
    w = max(len(s["name"]) for s in stats)
    p(f"{'notebook':<{w}}  exported  median  max (cell)  >{BIG_CELL} lines  tested")
    for s in stats:
        ex = s["exported"]
        if not ex: p(f"{s['name']:<{w}}  {0:>8}"); continue
        i, n, _ = max(ex, key=lambda e: e[1])
        median, big = statistics.median(e[1] for e in ex), sum(e[1] > BIG_CELL for e in ex)
        p(f"{s['name']:<{w}}  {len(ex):>8}  {median:>6g}  {f'{n} ({i})':>10}  {big:>9}"
          f"  {100 * sum(e[2] for e in ex) / len(ex):>5.0f}%")
    p("")
    p("largest exported cells (lines, notebook, cell index):")
    for name, i, n, t in sorted(cells, key=lambda c: -c[2])[:top]:
        p(f"  {n:>4}  {name} cell {i}{'' if t else '  (not tested within two cells)'}")

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="*", default=["nbs"], help="folders or notebooks to measure (default nbs)")
    ap.add_argument("--top", type=int, default=5, help="how many of the largest exported cells to list")
    args = ap.parse_args(argv)
    found = [(p, str(p.relative_to(r)) if r.is_dir() else p.name)
             for r in map(Path, args.roots) for p in notebooks(r)]
    if not found: print(f"no notebooks under {', '.join(args.roots)}", file=sys.stderr); return 1
    report([p for p, _ in found], args.top, [l for _, l in found])
    return 0

if __name__ == "__main__": sys.exit(main())
