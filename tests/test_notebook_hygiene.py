"""House rules that tools rely on: nbdev's docs processing executes cells holding imports on their own, so a
cell must not mix imports with other code (STYLE.md); every notebook starts with its `default_exp` (if it
exports) and its title; and the outputs stored in the notebooks (the docs show them) hold no local paths and
no stray warnings.

Every notebook under nbs/ is checked, subfolders included (nbs/examples/); like nbdev, folders starting with
`_` or `.` (`.ipynb_checkpoints`) are skipped."""
import ast, json, re
from pathlib import Path
import pytest

NBS_DIR = Path(__file__).resolve().parents[1] / "nbs"

def notebooks(root: Path = NBS_DIR) -> list[Path]:
    "Every notebook under `root`, subfolders too, except in `_`/`.`-prefixed folders (scratch, checkpoints)."
    return sorted(p for p in root.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts[:-1]))

NBS = notebooks()
def _id(p: Path) -> str: return str(p.relative_to(NBS_DIR))

def test_notebooks_found():
    "The checks below are parametrized over the notebooks: an empty list would make them pass vacuously."
    assert len(NBS) >= 10, f"only {len(NBS)} notebooks found under {NBS_DIR}"

@pytest.mark.parametrize("nb", NBS, ids=_id)
def test_no_cell_mixes_imports_with_code(nb):
    bad = []
    for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or re.search(r"^#\|\s*export", src, re.M): continue
        body = ast.parse(src).body
        kinds = {isinstance(n, (ast.Import, ast.ImportFrom)) for n in body}
        if kinds == {True, False}: bad.append(i)
    assert not bad, (f"{_id(nb)}: cells {bad} mix imports with other code; "
                     "move the imports to the import cells at the top")

@pytest.mark.parametrize("nb", NBS, ids=_id)
def test_header(nb):
    cells = json.loads(nb.read_text())["cells"]
    first = "".join(cells[0]["source"])
    if re.match(r"#\|\s*default_exp\s+\w+", first): title = "".join(cells[1]["source"])
    else: title = first   # a notebook that exports nothing (the index, a tutorial) starts with its title
    assert cells[1 if title is not first else 0]["cell_type"] == "markdown" and title.startswith("# "), \
        f"{_id(nb)}: must start with `#| default_exp name` (if it exports) and then a `# Title` markdown cell"

# Stored outputs are published in the docs and README: a path from the machine that ran them says nothing to a
# reader (and can leak a user name), and a warning in them is a bug to fix or noise to silence in the
# notebook. A path counts when it starts a word (so a URL such as https://host/home/ does not).
LOCAL_PATH = re.compile(r"(?<![\w.:/~-])/(?:root|home|tmp|work|Users)/|\.venv/|site-packages|[A-Z]:\\Users\\")
# Python prints a warning as `file:line: SomeWarning: message`; tqdm's `IProgress not found` is one of them.
WARNING = re.compile(r"\b[A-Z]\w*Warning: |IProgress not found")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")   # tracebacks are stored with terminal colours

def _text(x) -> str: return "".join(x) if isinstance(x, list) else str(x)

def output_texts(output: dict) -> list[tuple[str, str]]:
    "(kind, text) for each text an output holds: stream text, each text/* form of a result, a traceback."
    if output["output_type"] == "stream": return [(output.get("name", "stream"), _text(output["text"]))]
    if output["output_type"] == "error":
        return [("traceback", ANSI.sub("", "\n".join(output.get("traceback", []))))]
    return [(mime, _text(v)) for mime, v in output.get("data", {}).items() if mime.startswith("text/")]

CHECKS = (("local path", LOCAL_PATH), ("warning", WARNING))

def output_problems(cells: list[dict]) -> list[str]:
    "'cell N (kind): reason: line' for each output line that holds a local path or a warning."
    found = []
    for i, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            for kind, text in output_texts(output):
                for line in text.splitlines():
                    why = [reason for reason, pattern in CHECKS if pattern.search(line)]
                    if why: found.append(f"cell {i} ({kind}): {' and '.join(why)}: {line.strip()[:200]}")
    return found

def _cell(output_type: str, **output) -> dict:
    return {"cell_type": "code", "source": [], "outputs": [{"output_type": output_type, **output}]}

def test_output_problems_are_found():
    "The patterns catch what they are for (a tqdm warning, a path, a Python warning) and leave a URL alone."
    tqdm = ("/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: "
            "IProgress not found. Please update jupyter and ipywidgets. See https://ipywidgets.rtfd.io/")
    cells = [_cell("stream", name="stderr", text=[tqdm]),
             _cell("execute_result", data={"text/plain": ["PosixPath('/home/ana/data.csv')"]}),
             _cell("stream", name="stderr", text=["x.py:3: FutureWarning: the default will change\n"]),
             _cell("display_data", data={"text/html": ["<a href='https://x.org/home/'>docs</a>"]}),
             {"cell_type": "markdown", "source": ["Warning: not an output"]}]
    found = output_problems(cells)
    where = [f.split(":")[0] for f in found]
    assert where == ["cell 0 (stderr)", "cell 1 (text/plain)", "cell 2 (stderr)"], found
    assert "local path and warning" in found[0] and "warning: x.py:3" in found[2], found

@pytest.mark.parametrize("nb", NBS, ids=_id)
def test_outputs_hold_no_local_paths_or_warnings(nb):
    found = output_problems(json.loads(nb.read_text())["cells"])
    assert not found, (f"{_id(nb)}: stored outputs hold local paths or warnings; fix or silence the cause in "
                       "the notebook (e.g. install ipywidgets for tqdm), rerun it and save it:\n  "
                       + "\n  ".join(found))


# The repository explains itself: no notebook, module, test or README sends the reader to a text it does not hold.
OUTSIDE = re.compile(r"DESIGN\.md|GUIDE\.md|\bthe guide\b|\bguide's\b|shared/(GUIDE|DESIGN|STYLE)|\bDESIGN contract\b",
                     re.IGNORECASE)
ROOT = NBS_DIR.parent
TEXTS = NBS + sorted((ROOT / "mmfm").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + [ROOT / "README.md"]


def test_outside_reference_pattern_is_found():
    assert OUTSIDE.search("as the guide says") and OUTSIDE.search("see DESIGN.md, contract 5")
    assert not OUTSIDE.search("a guided tour of the design notebook")


@pytest.mark.parametrize("path", [p for p in TEXTS if p.name != "test_notebook_hygiene.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_texts_outside_the_repository(path):
    hits = [f"line {i}: {line.strip()[:100]}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} refers to a text outside the repository: " + "; ".join(hits[:5])
