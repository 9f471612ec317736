"""Build one reveal.js deck per notebook: `make slides` writes build/slides/NAME.slides.html.

    python scripts/build_slides.py [NOTEBOOK ...] [--out build/slides]

A deck shows a notebook's committed outputs (nothing is executed) cut into slides by the cells'
slide metadata (metadata.slideshow.slide_type; scripts/slide_metadata.py assigns it).

Derivations are revealed one step at a time. The contract with the course's derivation helper:
a derivation is a display_data output whose text/latex is `\\begin{align*} line \\\\ line ...
\\end{align*}` and whose output metadata is {"dpo_course": {"derivation_steps": [line, ...]}}. In
a deck that output becomes one reveal.js fragment per step, each its own align* block (a step
may carry \\tag{n}), and the cell's code is hidden: the audience sees the mathematics.

The decks open from disk (file://) with no network. nbconvert's reveal template would load
reveal.js, jQuery, require.js, MathJax 2 and mermaid from CDNs; site/templates/dpo_slides loads
local copies instead, which this script copies into the output's _static/ folder from two PyPI
packages of the `site` extra: reveal.js 5 from sphinx-revealjs, MathJax 3 from
django-static-mathjax (both installed by `make setup`, so a build needs no network).
"""

import argparse
import html
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import nbformat
from nbconvert import SlidesExporter
from nbconvert.preprocessors import Preprocessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_metadata import DERIVATION_KEY, expected_slides, problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "site" / "templates"
STATIC = ROOT / "site" / "static"
REMOTE_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*(?:https?:)?//[^)]*\)")
REMOTE_IMG_TAG = re.compile(r"<img\b[^>]*\bsrc=[\"'](?:https?:)?//[^>]*>", re.IGNORECASE)
NBVAL_MARKER = re.compile(r"^[ \t]*# NBVAL_\w+[ \t]*\n?", re.MULTILINE)
MATH_SPAN = re.compile(r"\$\$.*?\$\$|(?<!\\)\$[^$]+?(?<!\\)\$", re.DOTALL)
CODE_SPAN = re.compile(r"(^[ \t]*```.*?^[ \t]*```|`[^`\n]+`)", re.DOTALL | re.MULTILINE)
WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ('<p class="dpo-widget-note">An interactive control stands here: run the notebook '
               "in Jupyter or Colab to use it.</p>")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Python package {name!r} is missing: it ships the slides' local "
                         "JavaScript. Install the site extra: pip install -e '.[site]'")
    return Path(next(iter(spec.submodule_search_locations)))


def copy_static(out: Path, reveal: bool = True) -> None:
    """Copy MathJax 3, site/static/ and (for decks) reveal.js into out/_static.

    These are the only files a deck or a page loads besides itself.
    """
    static = out / "_static"
    mathjax = _package_dir("mathjax") / "static" / "mathjax" / "es5"
    if reveal:
        source = _package_dir("sphinx_revealjs") / "_static" / "revealjs"
        no_maps = shutil.ignore_patterns("*.map", "*.esm.js")
        for part in ("dist", "plugin/notes"):
            shutil.copytree(source / part, static / "reveal.js" / part, ignore=no_maps,
                            dirs_exist_ok=True)
    (static / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copy2(mathjax / "tex-svg-full.js", static / "mathjax" / "tex-svg-full.js")
    shutil.copytree(STATIC, static, dirs_exist_ok=True)


class OfflineContent(Preprocessor):
    """Keep a page free of network requests and of test-harness noise.

    Remote images in markdown (the Colab badge) become their alt text, inside their link.
    Inline maths that wraps onto a new line is joined into one line first, as JupyterLab keeps
    maths away from its markdown parser: a wrapped line that starts with "- " would otherwise
    become a list item and cut the formula in two.
    Widgets cannot run without a kernel, so a widget output becomes a note and the notebook's
    widget state is dropped. `# NBVAL_...` marker lines are for the test run, not for readers.
    """

    def preprocess(self, nb, resources):
        nb.metadata.pop("widgets", None)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            parts = CODE_SPAN.split(cell.source)  # odd parts are code: leave them alone
            text = "".join(p if i % 2 else MATH_SPAN.sub(_one_line, p)
                           for i, p in enumerate(parts))
            text = REMOTE_IMAGE.sub(r"\1", text)
            cell.source = REMOTE_IMG_TAG.sub(_alt_text, text)
        if cell.cell_type == "code":
            cell.source = NBVAL_MARKER.sub("", cell.source)
            for output in cell.outputs:
                if WIDGET in output.get("data", {}):
                    output.data = {"text/html": WIDGET_NOTE}
        return cell, resources


def _one_line(match: re.Match) -> str:
    span = match.group(0)
    return span if span.startswith("$$") else re.sub(r"\s*\n\s*", " ", span)


def _alt_text(match: re.Match) -> str:
    alt = re.search(r"\balt=[\"']([^\"']*)", match.group(0))
    return alt.group(1) if alt else ""


def derivation_steps(output) -> list[str] | None:
    """The steps of a derivation output (the contract in the module docstring), else None."""
    steps = output.get("metadata", {}).get(DERIVATION_KEY, {}).get("derivation_steps")
    if steps is None:
        return None
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"output metadata {DERIVATION_KEY}.derivation_steps must be a non-empty "
                         f"list of LaTeX strings, one per step; got {steps!r}")
    return steps


def fragments_html(steps: list[str]) -> str:
    """One reveal.js fragment per step, each step its own align* block for MathJax."""
    # A step without its own left side ("&= ...") gets the first step's, invisible, so that the
    # steps' = signs line up when each is typeset on its own (slides.css sets them flush left).
    first_lhs = steps[0].split("&", 1)[0] if "&" in steps[0] else ""
    divs = []
    for number, step in enumerate(steps, start=1):
        if first_lhs.strip() and number > 1 and step.lstrip().startswith("&"):
            step = rf"\phantom{{{first_lhs.strip()}}} {step.lstrip()}"
        latex = html.escape(rf"\begin{{align*}} {step} \end{{align*}}", quote=False)
        tag = re.search(r"\\tag\*?\{([^}]*)\}", step)  # the paper's equation number, if any
        tag = f' data-tag="{html.escape(tag.group(1))}"' if tag else ""
        divs.append(f'<div class="dpo-step fragment" data-step="{number}"{tag}>{latex}</div>')
    return '<div class="dpo-derivation">\n' + "\n".join(divs) + "\n</div>"


class DerivationFragments(Preprocessor):
    """In a deck: each derivation output becomes its steps as fragments, and its code is hidden.

    stderr (warnings, progress bars) is dropped too: it is noise on a projector.
    """

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, resources
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                continue
            steps = derivation_steps(output)
            if steps is not None:
                output = nbformat.v4.new_output("display_data",
                                                data={"text/html": fragments_html(steps)})
                cell.metadata["transient"] = {"remove_source": True}
            outputs.append(output)
        cell.outputs = outputs
        return cell, resources


def exporter() -> SlidesExporter:
    """nbconvert's SlidesExporter on the course's offline template, with our preprocessors."""
    slides = SlidesExporter(template_name="dpo_slides", extra_template_basedirs=[str(TEMPLATES)],
                            reveal_url_prefix="_static/reveal.js", reveal_theme="white",
                            exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    slides.register_preprocessor(OfflineContent(), enabled=True)
    slides.register_preprocessor(DerivationFragments(), enabled=True)
    return slides


def build_deck(path: Path, out: Path) -> Path:
    """Write out/NAME.slides.html for the notebook at `path`; raise if it lacks slide metadata."""
    nb = nbformat.read(path, as_version=4)
    missing = problems(nb)
    if missing:
        raise SystemExit(f"{path}: {missing[0]} (and {len(missing) - 1} more). Give the cells "
                         f"slide metadata first: python scripts/slide_metadata.py {path}")
    body, _ = exporter().from_notebook_node(nb, resources={"metadata": {
        "name": path.stem, "path": str(path.parent)}})
    target = out / f"{path.stem}.slides.html"
    target.write_text(body, encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "slides")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    copy_static(args.out)
    for path in notebooks:
        target = build_deck(path, args.out)
        slides = expected_slides(nbformat.read(path, as_version=4))
        print(f"{target}: {slides} slides")
    return 0


if __name__ == "__main__":
    sys.exit(main())
