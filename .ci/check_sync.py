"""Fail if `nbdev_export` would change mmfm/, if `nbdev_clean` would change nbs/, or if README.md lags nbs/index.ipynb.

Both tools are run for real (so afterwards the working tree is in sync); the check compares file contents before and after.
"""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent

def snapshot(folder, pattern):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root/folder).rglob(pattern))
            if '.ipynb_checkpoints' not in p.parts and '__pycache__' not in p.parts}

def changed(before, after): return sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))

failed = False
for tool, folder, pattern in [('nbdev_export', 'mmfm', '*.py'), ('nbdev_clean', 'nbs', '*.ipynb')]:
    before = snapshot(folder, pattern)
    subprocess.run([str(bin_dir/tool)], cwd=root, check=True)
    diff = changed(before, snapshot(folder, pattern))
    if diff:
        failed = True
        print(f"{tool} changed {len(diff)} file(s) in {folder}/ (now fixed in the working tree; review and commit):")
        for d in diff: print("   ", d)
rc = subprocess.run([sys.executable, str(root/'.ci'/'readme.py'), '--check'], cwd=root).returncode
if failed or rc: sys.exit(1)
print("in sync: mmfm/ matches the notebooks, the notebooks are clean, README.md matches nbs/index.ipynb")
