"""Give each notebook cell reveal.js slide metadata by fixed rules.

`make slides` (build_slides.py) lays a lecture out by the cells' content and honours two of
these types: a cell marked skip stays out of the deck, one marked notes goes to the speaker
notes. Jupyter's own slideshows (JupyterLab, `jupyter nbconvert --to slides`) use all of them.

    python scripts/slide_metadata.py notebooks/*.ipynb          # assign, rewrite changed notebooks
    python scripts/slide_metadata.py --check notebooks/*.ipynb  # exit 1 if a cell has none

The metadata is Jupyter's own: `cell.metadata.slideshow.slide_type`, one of slide, subslide,
fragment, skip, notes or "-" (continue the current slide), the same field that JupyterLab's
property inspector and nbconvert's SlidesExporter use. A cell that already has one keeps it, so a
type set by hand survives every later run. The script changes cell metadata only: sources and
outputs are written back as nbformat read them, and a notebook that needs no change is not
rewritten, so a second run changes nothing.

Rules, for a cell without a slide type; the first that matches wins:
 1. the first cell (title and learning goals) is a slide;
 2. a code cell before the first "## " heading (Colab install, imports, mode set-up): skip;
 3. an exercise solution (markdown that opens with <details><summary>Solution): skip, so the
    deck does not give answers away;
 4. markdown that opens with "# " or "## ": slide; with "### " or "**Exercise": subslide;
 5. a code cell with a derivation output (output metadata dpo_course.derivation_steps):
    subslide; build_slides.py hides its code and reveals each step as a fragment, so the cell
    itself is not a fragment (that would cost an empty click);
 6. a cell with a figure (an image output), or longer than LONG lines of source plus printed
    text: subslide, since it needs the room;
 7. anything else: "-" (it continues the current slide).
"""

import argparse
import re
import sys
from pathlib import Path

import nbformat

SLIDE_TYPES = ("slide", "subslide", "fragment", "skip", "notes", "-")
LONG = 18  # lines of source plus printed text that fit under a heading on a 1280x800 slide
DERIVATION_KEY = "dpo_course"  # output metadata: {"dpo_course": {"derivation_steps": [...]}}
SOLUTION = re.compile(r"^\s*<details>\s*<summary>\s*Solution", re.IGNORECASE)  # as tests/


def source_text(cell) -> str:
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def has_derivation(cell) -> bool:
    """True if one of the cell's outputs carries derivation steps (the derivation helper's)."""
    return any(o.get("metadata", {}).get(DERIVATION_KEY, {}).get("derivation_steps")
               for o in cell.get("outputs", []))


def _has_image(cell) -> bool:
    return any(k.startswith("image/") for o in cell.get("outputs", []) for k in o.get("data", {}))


def _lines(cell) -> int:
    printed = sum(len(str(o.get("text", "")).splitlines()) for o in cell.get("outputs", []))
    return len(source_text(cell).splitlines()) + printed


def rule_type(cell, index: int, before_first_section: bool) -> str:
    """The slide type that rules 1-7 (module docstring) give a cell, ignoring its metadata."""
    text = source_text(cell).lstrip()
    if index == 0:
        return "slide"
    if cell["cell_type"] == "code" and before_first_section:
        return "skip"
    if cell["cell_type"] == "markdown":
        if SOLUTION.match(text):
            return "skip"
        if text.startswith(("# ", "## ")):
            return "slide"
        if text.startswith(("### ", "**Exercise")):
            return "subslide"
    if cell["cell_type"] == "code" and has_derivation(cell):
        return "subslide"
    if _has_image(cell) or _lines(cell) > LONG:
        return "subslide"
    return "-"


def slide_type(cell) -> str | None:
    """The cell's slide type from its metadata, or None if it has none."""
    return cell.get("metadata", {}).get("slideshow", {}).get("slide_type")


def assign(nb) -> int:
    """Give every cell of `nb` without a slide type the rules' one, in place; return how many."""
    changed, before_first_section = 0, True
    for index, cell in enumerate(nb.cells):
        if cell["cell_type"] == "markdown" and source_text(cell).lstrip().startswith("## "):
            before_first_section = False
        if slide_type(cell) is None:
            cell.metadata.setdefault("slideshow", {})["slide_type"] = rule_type(
                cell, index, before_first_section)
            changed += 1
    return changed


def problems(nb) -> list[str]:
    """What --check reports: cells with no slide type or an unknown one."""
    out = []
    for index, cell in enumerate(nb.cells):
        kind = slide_type(cell)
        if kind is None:
            out.append(f"cell {index} has no metadata.slideshow.slide_type")
        elif kind not in SLIDE_TYPES:
            out.append(f"cell {index} has slide_type {kind!r}, not one of {SLIDE_TYPES}")
    return out


def expected_slides(nb) -> int:
    """How many slides (reveal.js sections, vertical ones included) the metadata asks for.

    nbconvert makes the first visible cell a slide whatever its type; after it, each slide or
    subslide cell opens one more.
    """
    kinds = [slide_type(c) or "-" for c in nb.cells]
    visible = [i for i, k in enumerate(kinds) if k not in ("skip", "notes")]
    if not visible:
        raise ValueError("every cell is skip or notes: there is nothing to show")
    return 1 + sum(k in ("slide", "subslide") for k in kinds[visible[0] + 1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a cell lacks slide metadata")
    args = parser.parse_args(argv)
    failed = False
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        if args.check:
            for problem in problems(nb):
                failed = True
                print(f"{path}: {problem}; run python scripts/slide_metadata.py {path}")
            continue
        changed = assign(nb)
        if changed:
            nbformat.write(nb, path)
        print(f"{path}: {changed} cells given slide metadata, {expected_slides(nb)} slides")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
