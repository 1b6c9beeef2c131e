"""Write README.md from nbs/index.ipynb without Quarto (nbdev_readme needs Quarto, which cannot be installed here).

Code cells keep their source (less nbdev directives) and their text outputs; `#| hide` cells are left out.
Usage: python .ci/readme.py [--check]   (--check: exit 1 if README.md is out of date, writing nothing)
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
directive = re.compile(r'^\s*#\s*\|')

def cell_md(cell):
    src = ''.join(cell['source'])
    if cell['cell_type'] == 'markdown': return src.strip()
    if cell['cell_type'] != 'code': return ''
    lines = src.splitlines()
    if any(re.match(r'^\s*#\s*\|\s*hide\b', l) for l in lines): return ''
    code = '\n'.join(l for l in lines if not directive.match(l)).strip()
    parts = [f"```python\n{code}\n```"] if code else []
    for out in cell.get('outputs', []):
        text = out.get('text') or out.get('data', {}).get('text/markdown') or out.get('data', {}).get('text/plain')
        if text: parts.append("```\n" + ''.join(text).rstrip() + "\n```")
    return '\n\n'.join(parts)

def render():
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    body = '\n\n'.join(p for p in map(cell_md, nb['cells']) if p)
    return "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n" + body + '\n'

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `make readme` and commit it.")
    else: readme.write_text(text)
