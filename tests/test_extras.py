"""`pip install mmfm` is the core (tables, series, shards, codecs, the transformer, training, prediction);
`mmfm[astro]` adds the survey stack (astropy, reproject, GalSim) and `mmfm[medical]` the ECG simulator (neurokit2).
These tests check both halves of that promise: the extras' packages are not core requirements, and every core module
imports in a Python where they cannot be imported at all."""
import configparser, pkgutil, shlex, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PACKAGES = {"astro": ["astropy", "reproject", "galsim", "speclite"], "medical": ["neurokit2"]}
# modules that need an extra, and the worked examples (which use both)
EXTRA_MODULES = {"mmfm.surveys", "mmfm.simulate", "mmfm.align", "mmfm.image_codecs", "mmfm.medical"}


def _settings():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def _names(reqs: str) -> set[str]:
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in shlex.split(reqs)}


def test_extras_are_declared_and_not_core():
    s = _settings()
    core = _names(s["requirements"])
    for extra, packages in EXTRA_PACKAGES.items():
        declared = _names(s[f"{extra}_requirements"])
        assert set(packages) <= declared, (extra, declared)
        assert not core & set(packages), f"{sorted(core & set(packages))} are core requirements, not [{extra}]"


def core_modules() -> list[str]:
    import mmfm
    names = [f"mmfm.{m.name}" for m in pkgutil.iter_modules(mmfm.__path__) if not m.ispkg and m.name != "_modidx"]
    return sorted(set(names) - EXTRA_MODULES)


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED: raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: an extra)")
sys.meta_path.insert(0, Block())
"""


def test_core_modules_import_without_the_extras():
    blocked = sorted(p for ps in EXTRA_PACKAGES.values() for p in ps)
    code = BLOCKER.format(blocked=blocked) + "\n".join(
        ["import importlib", f"for m in {core_modules()!r}: importlib.import_module(m)",
         "assert not any(k.split('.')[0] in BLOCKED for k in sys.modules), sorted(sys.modules)",
         "import mmfm.cli; print('ok')"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert len(core_modules()) >= 15
