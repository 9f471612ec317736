"""Build the course site: `make site` writes build/site/; open build/site/index.html from disk.

    python scripts/build_site.py [NOTEBOOK ...] [--out build/site]

Pages: a home page (the README's introduction and notebook table), one page per notebook with
its committed outputs (nothing is executed; any number of notebooks), previous/next links and a
list of all notebooks on every page, a gallery of figures/*.png, and handout.html: every
derivation the notebooks display (the contract in build_slides.py), print-ready (A4 @media print
CSS: one derivation never splits across pages). Maths is typeset by a local MathJax 3; no page
makes a network request.

Why nbconvert with a template, not Jupyter Book 2 (mystmd) or Jupyter Book 1 (Sphinx):
- mystmd, Jupyter Book 2's engine, fetches its site theme at build time: with mystmd 1.11.0,
  `myst build --html` queries https://api.mystmd.org/templates/site/myst/book-theme and stops
  when offline (checked here). It also needs Node.js; this course needs only Python and make.
- Jupyter Book 1 builds offline but is the generation that Jupyter Book 2 replaced, and it would
  bring Sphinx's whole build system for six pages.
- nbconvert is Jupyter's own converter, already installed with the course extra, renders the
  committed outputs as JupyterLab shows them, and also builds the decks (build_slides.py): one
  tool, and a small Jinja template (site/templates/dpo_page) that adds the navigation and
  replaces its CDN references (require.js, MathJax 2, mermaid) with local copies.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

import jinja2
import nbformat
from markupsafe import Markup
from nbconvert import HTMLExporter
from nbconvert.filters import markdown2html

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_slides import TEMPLATES, OfflineContent, copy_static, derivation_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COURSE = "dpo-course"
SCREENSHOTS = ("slides_", "site_")  # figures/ files that tests/test_browser.py writes
TAG = re.compile(r"\\tag\*?\{([^}]*)\}")


def notebook_title(nb, fallback: str) -> str:
    """The text of the notebook's first "# " heading, without its "01 · " number."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return re.sub(r"^\d+\s*[·.:-]\s*", "", line[2:].strip())
    return fallback


def readme_table(readme: str) -> dict[str, dict]:
    """The README's notebook table: {"notebooks/NAME.ipynb": {"goal": ..., ...}} per row."""
    rows, header = {}, None
    for line in readme.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.search(r"\]\((notebooks/[^)]+\.ipynb)\)", line)
        if header is None:
            header = [c.lower() for c in cells]
        elif link:
            named = dict(zip(header, cells))
            rows[link.group(1)] = {
                key: next((v for k, v in named.items() if k.startswith(key)), "")
                for key in ("goal", "hardware", "run time")}
    return rows


def _inline_markdown(text: str) -> Markup:
    html = markdown2html(text).strip()
    return Markup(re.sub(r"^<p>(.*)</p>$", r"\1", html, flags=re.DOTALL))


def page_list(notebooks: list[Path], readme: str) -> list[dict]:
    """One entry per notebook, in order: its page, title, number, and README columns if any."""
    table = readme_table(readme)
    pages = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        row = table.get(f"notebooks/{path.name}", {})
        pages.append({
            "path": path, "href": f"{path.stem}.html", "title": notebook_title(nb, path.stem),
            "number": path.stem.split("_", 1)[0], "goal": _inline_markdown(row.get("goal", "")),
            "hardware": row.get("hardware", ""), "run_time": row.get("run time", "")})
    return pages


def nav(pages: list[dict], current: str, index: int | None = None) -> dict:
    """What the top bar and the pager of one page show."""
    prev = pages[index - 1] if index else None
    after = pages[index + 1] if index is not None and index + 1 < len(pages) else None
    if index is None:  # home, figures, handout: "next" is the first notebook
        after = pages[0] if pages else None
    return {"course": COURSE, "pages": pages, "current": current, "prev": prev, "next": after}


def derivations(nb) -> list[dict]:
    """The notebook's derivation outputs, each with the heading of the section it sits in.

    An equation number \\tag{n} is written "(n)" at the end of its line: a tagged formula spans
    the page in MathJax and could not shrink to fit the paper, an untagged one can.
    """
    found, section = [], ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            headings = [ln.lstrip("#").strip() for ln in cell.source.splitlines()
                        if ln.startswith("#")]
            section = headings[-1] if headings else section
        for output in cell.get("outputs", []):
            steps = derivation_steps(output)
            if steps:
                lines = [TAG.sub(r"\\qquad (\1)", step) for step in steps]
                latex = r"\begin{align*}" + " \\\\\n".join(lines) + r"\end{align*}"
                found.append({"section": section, "latex": latex})
    return found


def render_notebook(page: dict, site_nav: dict, out: Path) -> None:
    exporter = HTMLExporter(template_name="dpo_page", extra_template_basedirs=[str(TEMPLATES)],
                            exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    exporter.register_preprocessor(OfflineContent(), enabled=True)
    nb = nbformat.read(page["path"], as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={
        "metadata": {"name": page["title"], "path": str(page["path"].parent)},
        "dpo_nav": site_nav})
    (out / page["href"]).write_text(body, encoding="utf-8")


def build(notebooks: list[Path], out: Path, readme: Path, figures: Path) -> list[Path]:
    """Write the whole site into `out`; return the pages written."""
    out.mkdir(parents=True, exist_ok=True)
    copy_static(out, reveal=False)
    pages = page_list(notebooks, readme.read_text(encoding="utf-8") if readme.exists() else "")
    for index, page in enumerate(pages):
        render_notebook(page, nav(pages, page["href"], index), out)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader([TEMPLATES, TEMPLATES / "dpo_page"]),
                             autoescape=True)
    intro = readme.read_text(encoding="utf-8").split("\n\n")[1] if readme.exists() else ""
    (out / "figures").mkdir(exist_ok=True)
    gallery = []
    for png in sorted(figures.glob("*.png")):
        if png.name.startswith(SCREENSHOTS):
            continue
        shutil.copy2(png, out / "figures" / png.name)
        number = re.match(r"nb(\d+)_", png.name)
        page = next((p for p in pages if number and p["number"] == number.group(1)), None)
        gallery.append({"name": png.name, "page": page})
    handout = [{"page": p, "derivations": derivations(nbformat.read(p["path"], as_version=4))}
               for p in pages]
    others = {
        "index.html": ("home.html.j2", {"title": COURSE, "intro": _inline_markdown(intro)}),
        "figures.html": ("figures.html.j2", {"title": f"{COURSE}: figures", "figures": gallery}),
        "handout.html": ("handout.html.j2", {
            "title": f"{COURSE}: derivations",
            "notebooks": [h for h in handout if h["derivations"]]}),
    }
    for name, (template, context) in others.items():
        html = env.get_template(template).render(nav=nav(pages, name), **context)
        (out / name).write_text(html, encoding="utf-8")
    return [out / name for name in others] + [out / p["href"] for p in pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "site")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for page in build(notebooks, args.out, args.readme, args.figures):
        print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
