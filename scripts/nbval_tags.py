"""Turn nbval's `# NBVAL_*` comments in code cells into cell tags, so students never see them.

    python scripts/nbval_tags.py notebooks/*.ipynb          # convert, rewrite changed notebooks
    python scripts/nbval_tags.py --check notebooks/*.ipynb  # exit 1 if a cell still has one

nbval reads a cell's directives from its comments and, equally, from its tags
(`metadata.tags`): `# NBVAL_IGNORE_OUTPUT` is the tag `nbval-ignore-output`, `# NBVAL_SKIP` is
`nbval-skip`, and so on (the table below). A tag is invisible in Colab and on GitHub, and it also
survives every re-execution. Run this after merging a branch that still writes comments: each
marker line is removed from the source and its tag added (once); sources, outputs and all other
metadata are written back as nbformat read them, and a notebook that needs no change is not
rewritten, so a second run changes nothing.

`NBVAL_RAISES_EXCEPTION` becomes `raises-exception`, the tag that both nbval and nbconvert's
executor honour (nbval's own `nbval-raises-exception` would stop `nbconvert --execute`).
"""

import argparse
import re
import sys
from pathlib import Path

import nbformat

TAGS = {
    "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "NBVAL_SKIP": "nbval-skip",
    "NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "NBVAL_RAISES_EXCEPTION": "raises-exception",
}
MARKER = re.compile(r"^[ \t]*#[ \t]*(NBVAL_\w+)[ \t]*(?:\n|$)", re.MULTILINE)


def convert_cell(cell) -> list[str]:
    """Move the cell's NBVAL markers into its tags; return the tags added. Unknown ones raise."""
    if cell.cell_type != "code":
        return []
    found = MARKER.findall(cell.source)
    if not found:
        return []
    unknown = sorted(set(found) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown nbval marker(s) {unknown}; known: {sorted(TAGS)}")
    cell.source = MARKER.sub("", cell.source)
    tags = cell.metadata.setdefault("tags", [])
    added = []
    for marker in found:
        if TAGS[marker] not in tags:
            tags.append(TAGS[marker])
            added.append(TAGS[marker])
    return added


def convert(path: Path) -> int:
    """Convert one notebook in place; return the number of cells changed."""
    nb = nbformat.read(path, as_version=4)
    changed = sum(bool(MARKER.search(c.source)) for c in nb.cells if c.cell_type == "code")
    for cell in nb.cells:
        convert_cell(cell)
    if changed:
        nbformat.write(nb, path)
    return changed


def remaining(path: Path) -> list[int]:
    """Indices of the code cells that still carry an NBVAL comment."""
    nb = nbformat.read(path, as_version=4)
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and MARKER.search(c.source)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="only report, exit 1 if any left")
    args = parser.parse_args(argv)
    status = 0
    for path in args.notebooks:
        if args.check:
            left = remaining(path)
            if left:
                print(f"{path}: NBVAL comments in cells {left} (run scripts/nbval_tags.py)")
                status = 1
        else:
            n = convert(path)
            if n:
                print(f"{path}: {n} cell(s) converted to tags")
    return status


if __name__ == "__main__":
    sys.exit(main())
