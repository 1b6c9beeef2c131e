"""The documentation site: built offline (`make docs`), every public exported symbol documented, and the pages checked
in headless Chromium served from 127.0.0.1 (a screenshot is kept in test-artifacts/docs.png). `make test`
installs Chromium first (the Makefile's `chromium` target); without it the browser test fails, saying how to
install it.

Building the site executes the notebooks' export cells, so this is the slowest test (about a minute on 2 cores).
"""
import ast, importlib, re, shutil, socket, subprocess, sys, tempfile, time, contextlib
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ROOT / "_docs"
ARTIFACTS = ROOT / "test-artifacts"

@pytest.fixture(scope="module")
def site():
    r = subprocess.run(["make", "docs", f"BIN={BIN}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (DOCS / "index.html").exists()
    return DOCS

def notebook_of_module():
    "{module name: html page} from each notebook's default_exp."
    out = {}
    for nb in sorted((ROOT / "nbs").rglob("*.ipynb")):              # the examples live in nbs/examples/
        if any(part.startswith(("_", ".")) for part in nb.relative_to(ROOT / "nbs").parts): continue
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if m: out[m.group(1)] = nb.relative_to(ROOT / "nbs").with_suffix(".html").as_posix()
    return out

def public_top_level(module: str) -> tuple[list[str], list[str]]:
    "Names in the module's __all__ (nbdev writes it from the exported cells): (defined by def/class, assigned)."
    tree = ast.parse((ROOT / "mmfm" / f"{module.replace('.', '/')}.py").read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = [n for n in ast.literal_eval(node.value) if not n.startswith("_")]
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return [n for n in names if n in defined], [n for n in names if n not in defined]

def test_every_exported_symbol_is_documented(site):
    """Functions and classes get an API entry (signature, docstring, docments); factory-made classes
    (`ToyTable = table_modality(...)`) are named on their page; plain constants are not API entries."""
    missing = []
    for module, page in notebook_of_module().items():
        html = (site / page).read_text()
        ids = set(re.findall(r'id="([^"]+)"', html))
        defined, assigned = public_top_level(module)
        missing += [f"{module}.{n} (API entry on {page})" for n in defined if n.lower() not in ids]
        mod = importlib.import_module(f"mmfm.{module}")
        classes = [n for n in assigned if isinstance(getattr(mod, n, None), type)]   # constants are not API entries
        missing += [f"{module}.{n} (named on {page})" for n in classes if not re.search(rf"\b{re.escape(n)}\b", html)]
    assert not missing, "not in the docs: " + ", ".join(missing)

def _chromium():
    for c in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(c): return shutil.which(c)

@contextlib.contextmanager
def serve(directory: Path):
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0: break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally: proc.terminate(); proc.wait(10)

# The same command as the Makefile's `chromium` target, which `make test` runs first (so a missing Chromium
# fails here only when the tests are run some other way, or make could not install it).
INSTALL_CHROMIUM = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"

def chromium(args, url):
    exe = _chromium()
    # A fail, not a skip: a skipped browser check reads as a pass, and the site would go unchecked on a fresh
    # machine.
    if exe is None:
        pytest.fail(f"Chromium is not installed (needed to check the docs site); `make chromium` installs it, "
                    f"or as root: {INSTALL_CHROMIUM}")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1200,900", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

def test_install_command_matches_makefile():
    "The command the failure message gives is the one `make chromium` runs: following either does the same."
    assert f"CHROMIUM_INSTALL := {INSTALL_CHROMIUM}\n" in (ROOT / "Makefile").read_text(), \
        "INSTALL_CHROMIUM in tests/test_docs.py differs from CHROMIUM_INSTALL in the Makefile: make them equal"

def test_site_in_headless_chromium(site):
    pages = {"index.html": "mmfm", "02_codec.html": "CodecManager", "04_data.html": "MultiSourceDataset"}
    with serve(site) as base:
        for page, needle in pages.items():
            r = chromium(["--dump-dom"], f"{base}/{page}")
            assert r.returncode == 0, r.stderr[-2000:]
            assert needle in r.stdout, f"{page}: {needle!r} not in the rendered page"
            assert 'id="' in r.stdout and "<h" in r.stdout
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "docs.png"
        if shot.exists(): shot.unlink()
        r = chromium([f"--screenshot={shot}"], f"{base}/02_codec.html")
        assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
