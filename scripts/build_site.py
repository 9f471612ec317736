"""Build the course site: `make site` writes build/site/; open build/site/index.html from disk.

    python scripts/build_site.py [NOTEBOOK ...] [--out build/site]

Pages: a home page (the README's introduction, and a table of the lectures whose goals have
their maths typeset), one page per notebook with its committed outputs (nothing is executed;
any number of notebooks), starting at the lesson (the set-up code stays in the notebook), a
gallery of figures/*.png, the lecture decks (slides/, built by build_slides.py), and
handout.html: every derivation the notebooks display, grouped by section, each with one sentence
of context and each step's reason beside it, print-ready (A4 @media print CSS, at the size it is
read on screen: a derivation never splits across pages and no formula is shrunk).

Every page has a sidebar: the lectures, the current page's own contents, the decks, the
handout, the DPO paper (arXiv 2305.18290) and the repository; on a phone-width screen it sits
above the page. Maths is typeset by a local MathJax 3; no page makes a network request.

Why nbconvert with a template, not Jupyter Book 2 (mystmd) or Jupyter Book 1 (Sphinx):
- mystmd, Jupyter Book 2's engine, fetches its site theme at build time: with mystmd 1.11.0,
  `myst build --html` queries https://api.mystmd.org/templates/site/myst/book-theme and stops
  when offline (checked here). It also needs Node.js; this course needs only Python and make.
- Jupyter Book 1 builds offline but is the generation that Jupyter Book 2 replaced, and it would
  bring Sphinx's whole build system for six pages.
- nbconvert is Jupyter's own converter, already installed with the course extra, renders the
  committed outputs as JupyterLab shows them, and a small Jinja template (site/templates/
  dpo_page) adds the navigation and replaces its CDN references (require.js, MathJax 2,
  mermaid) with local copies.
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
from build_slides import (  # noqa: E402
    CHECK_PROSE,
    TEMPLATES,
    OfflineContent,
    _masked,
    build_deck,
    copy_static,
    derivation_steps,
    exp_form,
    heading_html,
    reason_html,
    split_step,
    step_html,
)
from deck_plan import LECTURES, PAPER, REPOSITORY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COURSE = "dpo-course"
SCREENSHOTS = ("slides_", "site_")  # figures/ files that tests/test_browser.py writes
HEADING = re.compile(r'<h([23]) id="([^"]+)">(.*?)<a class="anchor-link"', re.DOTALL)
SECTION = re.compile(r"^##\s")
HANDOUT_EMS = 14.0  # a step's maths column on A4 paper, beside its reason, in ems


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
        number = path.stem.split("_", 1)[0]
        # the plan's goal has its maths in TeX, so that MathJax typesets it; the README's is
        # plain text for GitHub
        goal = LECTURES.get(number, {}).get("home_goal") or row.get("goal", "")
        pages.append({
            "path": path, "href": f"{path.stem}.html", "title": notebook_title(nb, path.stem),
            "number": number, "goal": _inline_markdown(goal),
            "deck": f"slides/{path.stem}.slides.html",
            "hardware": row.get("hardware", ""), "run_time": row.get("run time", "")})
    return pages


def nav(pages: list[dict], current: str, index: int | None = None) -> dict:
    """What the top bar and the pager of one page show."""
    prev = pages[index - 1] if index else None
    after = pages[index + 1] if index is not None and index + 1 < len(pages) else None
    if index is None:  # home, figures, handout: "next" is the first notebook
        after = pages[0] if pages else None
    deck = pages[index]["deck"] if index is not None else None
    return {"course": COURSE, "pages": pages, "current": current, "prev": prev, "next": after,
            "current_deck": deck, "paper": PAPER, "repository": REPOSITORY}


def context_sentence(text: str) -> str:
    """The first sentence of a paragraph: one sentence that says what a derivation is for."""
    text = " ".join(text.split())
    end = re.search(r"[.!?](?=\s|$)", _masked(text))
    return text[:end.end()] if end else text


def context_html(paragraph: str, steps: list[str]) -> Markup:
    """One sentence of context: the paragraph's first, else what the derivation's first step
    does (its reason), so that no two derivations repeat the same sentence."""
    if paragraph:
        return _inline_markdown(context_sentence(paragraph))
    reason = split_step(steps[0])["reason"]
    return Markup(f"Next: {reason_html(reason)}.") if reason else Markup("")


def handout_steps(steps: list[str]) -> Markup:
    """A derivation as rows of maths with each step's reason beside it, for reading and print:
    the slides' layout without the one-step-per-click fragments."""
    lhs = split_step(exp_form(steps[0]))["lhs"]
    rows = [step_html(step, n, lhs if n == 1 else "", HANDOUT_EMS)[0]
            for n, step in enumerate(steps, start=1)]
    body = "\n".join(rows).replace(' fragment"', '"')
    return Markup(f'<div class="dpo-derivation">{body}</div>')


def derivations(nb) -> list[dict]:
    """The notebook's derivations, grouped by the section they sit in, each with one sentence
    of context: the first sentence of the paragraph that leads to it, or of its section's goal
    when that paragraph is about code."""
    sections, paragraph, goal = [], "", ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for block in (b.strip() for b in cell.source.split("\n\n") if b.strip()):
                if block.startswith("#"):
                    heading = block.lstrip("#").splitlines()[0].strip()
                    sections.append({"heading": heading_html(heading), "derivations": []})
                    paragraph = goal = ""
                    block = "\n".join(block.splitlines()[1:]).strip()
                if block.startswith("**Goal:**"):
                    goal = block.removeprefix("**Goal:**").strip()
                elif (block and "`" not in block and not block.startswith(("$$", "|", "<"))
                      and block[0].isupper() and not CHECK_PROSE.search(block)
                      and not block.startswith(("The check", "A check"))):
                    paragraph = block  # prose about the maths, not about code or checks
        for output in cell.get("outputs", []):
            steps = derivation_steps(output)
            if steps:
                if not sections:
                    sections.append({"heading": "", "derivations": []})
                first = not sections[-1]["derivations"]
                sections[-1]["derivations"].append({
                    "context": context_html(paragraph or (goal if first else ""), steps),
                    "steps": handout_steps(steps)})
                paragraph = ""  # the next derivation needs new prose, or says what it does
    return [s for s in sections if s["derivations"]]


def lesson_cells(nb) -> list:
    """A page starts at the lesson: the set-up code before the first section (the Colab
    install, the imports) stays in the notebook."""
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                  and SECTION.match(c.source.lstrip())), len(nb.cells))
    return [c for i, c in enumerate(nb.cells) if i >= first or c.cell_type == "markdown"]


NOTEBOOK_LINK = re.compile(r'href="(?:\./)?(\d\d_[\w-]+)\.ipynb')


def contents(body: str) -> str:
    """The page's own contents (its ## and ### headings), for the sidebar."""
    items = [f'<li class="dpo-toc-h{level}"><a href="#{anchor}">{text.strip()}</a></li>'
             for level, anchor, text in HEADING.findall(body)]
    return f'<ul class="dpo-toc">{"".join(items)}</ul>' if items else ""


def render_notebook(page: dict, site_nav: dict, out: Path) -> None:
    exporter = HTMLExporter(template_name="dpo_page", extra_template_basedirs=[str(TEMPLATES)],
                            exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    exporter.register_preprocessor(OfflineContent(), enabled=True)
    nb = nbformat.read(page["path"], as_version=4)
    nb.cells = lesson_cells(nb)
    body, _ = exporter.from_notebook_node(nb, resources={
        "metadata": {"name": page["title"], "path": str(page["path"].parent)},
        "dpo_nav": site_nav})
    body = body.replace("<!--dpo-toc-->", contents(body), 1)
    # A notebook links the next one by its file name; on the site that is its page.
    body = NOTEBOOK_LINK.sub(r'href="\1.html', body)
    (out / page["href"]).write_text(body, encoding="utf-8")


def build(notebooks: list[Path], out: Path, readme: Path, figures: Path) -> list[Path]:
    """Write the whole site into `out`; return the pages written."""
    out.mkdir(parents=True, exist_ok=True)
    copy_static(out, reveal=False)
    pages = page_list(notebooks, readme.read_text(encoding="utf-8") if readme.exists() else "")
    for index, page in enumerate(pages):
        render_notebook(page, nav(pages, page["href"], index), out)
    copy_static(out / "slides")  # the decks travel with the site
    for page in pages:
        build_deck(page["path"], out / "slides")

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
    handout = [{"page": p, "sections": derivations(nbformat.read(p["path"], as_version=4))}
               for p in pages]
    others = {
        "index.html": ("home.html.j2", {
            "title": COURSE, "intro": _inline_markdown(intro),
            "paper_cite": Markup(f"Rafailov et al. (2023), <em>{PAPER['title']}</em>")}),
        "figures.html": ("figures.html.j2", {"title": f"{COURSE}: figures", "figures": gallery}),
        "handout.html": ("handout.html.j2", {
            "title": f"{COURSE}: derivations",
            "notebooks": [h for h in handout if h["sections"]]}),
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
