"""House rules that tools rely on: nbdev's docs processing executes cells holding imports on their own, so a cell
must not mix imports with other code (STYLE.md); every notebook starts with its `default_exp` (if it exports) and its title."""
import ast, json, re
from pathlib import Path
import pytest

NBS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))

@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_no_cell_mixes_imports_with_code(nb):
    bad = []
    for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or re.search(r"^#\|\s*export", src, re.M): continue
        body = ast.parse(src).body
        kinds = {isinstance(n, (ast.Import, ast.ImportFrom)) for n in body}
        if kinds == {True, False}: bad.append(i)
    assert not bad, f"{nb.name}: cells {bad} mix imports with other code; move the imports to the import cells at the top"

@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_header(nb):
    cells = json.loads(nb.read_text())["cells"]
    first = "".join(cells[0]["source"])
    if re.match(r"#\|\s*default_exp\s+\w+", first): title = "".join(cells[1]["source"])
    else: title = first   # a notebook that exports nothing (the index, a tutorial) starts with its title
    assert cells[1 if title is not first else 0]["cell_type"] == "markdown" and title.startswith("# "), \
        f"{nb.name}: must start with `#| default_exp name` (if it exports) and then a `# Title` markdown cell"
