"""The package's import graph (read statically by tools/import_graph.py): no cycles, and the library does not
depend on its worked examples (nothing outside mmfm/examples/ imports from mmfm.examples)."""
import importlib.util
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
ig = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ig)

@pytest.fixture(scope="module")
def graph(): return ig.import_graph(ROOT / "mmfm")

def test_graph_is_read(graph):
    "The checks below would pass vacuously on an empty graph: the modules and their imports must be found."
    assert len(graph) >= 10 and sum(map(len, graph.values())) >= 10, f"graph too small: {graph}"
    assert "mmfm" in graph and "mmfm._modidx" not in graph, sorted(graph)   # __init__ in, nbdev's index out

def test_no_import_cycle(graph):
    found = ig.cycles(graph)
    assert not found, "import cycles in mmfm (break each by moving the shared code down a level):\n  " + \
        "\n  ".join(" -> ".join(c) for c in found)

def test_library_does_not_import_examples(graph):
    bad = ig.example_imports(graph, "mmfm")
    assert not bad, ("the library must not depend on its examples; move what these use out of "
                     "mmfm/examples/:\n  " + "\n  ".join(bad))

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, src in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(src)
    return tmp_path / "pkg"

def test_checks_catch_what_they_are_for(tmp_path):
    "A cycle of relative, absolute and deferred imports is found, and so is a library import of the examples."
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\nimport os\n",
        "b.py": "def f():\n    from pkg.sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\n",
        "d.py": "from pkg.examples import demo\n",
        "examples/demo.py": "from ..a import f\n",   # examples may use the library
        "_modidx.py": "import pkg.d\n"})
    g = ig.import_graph(pkg)
    assert g["pkg.a"] == {"pkg.b": [1]} and g["pkg.sub.c"] == {"pkg.a": [1]}, g
    assert ig.cycles(g) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert ig.example_imports(g, "pkg") == ["pkg.d (line 1) imports pkg.examples.demo"]
    assert ig.main([str(pkg)]) == 1
