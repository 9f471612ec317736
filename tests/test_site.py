"""Instructor mode without a browser: slide metadata rules, derivation fragments, offline HTML.

The notebooks here are synthetic (no notebooks/ file is touched); tests/test_browser.py opens
the same builds in Chromium.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from nbformat.v4 import new_code_cell, new_markdown_cell, new_output

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_site  # noqa: E402
import build_slides  # noqa: E402
import slide_metadata  # noqa: E402
from helpers import STEPS, synthetic_notebook  # noqa: E402

# What each cell of synthetic_notebook() gets from the rules, in order.
RULE_TYPES = ["slide", "skip", "slide", "subslide", "subslide", "-", "skip", "subslide", "-"]


def write(nb, path: Path) -> Path:
    nbformat.write(nb, path)
    return path


def test_rules_give_every_cell_a_slide_type():
    nb = synthetic_notebook()
    assert slide_metadata.assign(nb) == len(nb.cells)
    assert [slide_metadata.slide_type(c) for c in nb.cells] == RULE_TYPES
    assert slide_metadata.expected_slides(nb) == 5


def test_hand_set_metadata_is_kept_and_a_second_run_changes_nothing(tmp_path):
    nb = synthetic_notebook()
    nb.cells[5].metadata["slideshow"] = {"slide_type": "notes"}  # set by hand
    path = write(nb, tmp_path / "nb.ipynb")
    assert slide_metadata.main([str(path)]) == 0
    first = path.read_bytes()
    assert slide_metadata.main([str(path)]) == 0
    assert path.read_bytes() == first
    again = nbformat.read(path, as_version=4)
    assert slide_metadata.slide_type(again.cells[5]) == "notes"
    # Only metadata changed: sources and outputs are as they were.
    original = synthetic_notebook()
    assert [c.source for c in again.cells] == [c.source for c in original.cells]
    assert [c.get("outputs") for c in again.cells] == [c.get("outputs") for c in original.cells]


def test_check_fails_without_metadata_and_passes_with_it(tmp_path, capsys):
    path = write(synthetic_notebook(), tmp_path / "nb.ipynb")
    assert slide_metadata.main(["--check", str(path)]) == 1
    assert "cell 0 has no metadata.slideshow.slide_type" in capsys.readouterr().out
    assert nbformat.read(path, as_version=4).cells[0].metadata == {}  # --check writes nothing
    slide_metadata.main([str(path)])
    assert slide_metadata.main(["--check", str(path)]) == 0
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].metadata.slideshow.slide_type = "title"
    write(nb, path)
    assert slide_metadata.main(["--check", str(path)]) == 1


def test_derivation_becomes_one_fragment_per_step():
    html = build_slides.fragments_html(STEPS)
    steps = re.findall(r'<div class="dpo-step fragment" data-step="(\d)"[^>]*>'
                       r'<div class="dpo-step-math">(.*?)</div><div class="dpo-step-why">(.*?)'
                       r"</div></div>", html)
    assert [n for n, _, _ in steps] == ["1", "2", "3"]
    assert html.count('data-tag="1"') == 1  # the step with \tag{1}, for its screenshot
    assert all(s.startswith(r"\begin{align*}") and s.endswith(r"\end{align*}")
               for _, s, _ in steps)
    assert r"\tag{1}" in steps[0][1] and "&amp;=" in steps[1][1]  # escaped for HTML
    # the reason sits beside the maths, as words that wrap and maths that MathJax typesets
    assert steps[0][2] == "Bradley-Terry" and steps[1][2] == r"divide by \(e^{r_1}\)"
    assert "&&" not in html


def test_long_exponents_become_exp_and_wide_lines_break():
    assert build_slides.exp_form(r"e^{\frac{r}{\beta}} + e^{x}") == (
        r"\exp\left(\frac{r}{\beta}\right) + e^{x}")
    assert build_slides.exp_form(r"e^{a + e^{\frac{1}{2}}}") == (
        r"\exp\left(a + \exp\left(\frac{1}{2}\right)\right)")
    rhs = " + ".join([r"\pi_{1} \left(r_{1} - \beta \log{\left(\frac{\pi_{1}}{q_{1}}\right)}"
                      r"\right)"] * 4)
    lines = build_slides.break_lines("L", "= " + rhs)
    assert len(lines) > 1 and all(build_slides.tex_width(x) <= build_slides.MATH_EMS
                                  for x in lines[1:])
    # a sum inside one pair of parentheses breaks too, with parentheses that may span lines
    inner = build_slides.break_lines("L", r"= -\log\left(" + rhs + r"\right)")
    assert len(inner) > 1 and (r"\bigl(" in inner[0] or r"\Bigl(" in inner[0])
    wide = r"= \frac{1}{" + " + ".join([r"\exp\left(\beta \log{\left(a_{1} b_{2}\right)}"
                                         r"\right)"] * 4) + "}"
    assert r"\splitdfrac" in build_slides.split_fraction(wide, 20)


def test_lecture_structure_notes_and_what_stays_out():
    nb = synthetic_notebook()
    long = ("This first sentence stays on the slide. " + "The rest is detail. " * 20).strip()
    nb.cells.insert(3, new_markdown_cell(long))
    nb.cells.insert(4, new_code_cell("assert 1 == 1\nprint('checked')", outputs=[
        new_output("stream", name="stdout", text="checked\n")]))
    slides = build_slides.lecture(nb, "99")
    kinds = [s["kind"] for s in slides]
    assert kinds[:2] == ["title", "outline"] and kinds[-2:] == ["summary", "references"]
    assert "Lecture 99" in slides[0]["parts"][0] and "2305.18290" in slides[0]["parts"][0]
    assert all(s["title"] for s in slides)
    text = "\n".join(p for s in slides for p in s["parts"])
    notes = "\n".join(n for s in slides for n in s["notes"])
    assert "This first sentence stays on the slide." in text and "detail" not in text
    assert "The rest is detail." in notes  # the full paragraph is in the speaker notes
    assert "checked" not in text  # a check cell and its output stay out
    assert "x19 = 19" not in text  # code is hidden unless the plan names it
    derivation = [s for s in slides if s["kind"] == "derivation"]
    assert len(derivation) == 1 and len(derivation[0]["parts"]) == 1  # nothing before it


def test_bad_derivation_metadata_is_a_clear_error():
    output = new_output("display_data", data={"text/latex": "x"},
                        metadata={"dpo_course": {"derivation_steps": "x = y"}})
    with pytest.raises(ValueError, match="non-empty list of LaTeX strings"):
        build_slides.derivation_steps(output)


def _references(html: str) -> list[str]:
    """What a page loads by itself: src of scripts and images, href of stylesheets."""
    tags = re.findall(r"<(?:script|img|link|iframe|source)\b[^>]*>", html)
    return [m for tag in tags for m in re.findall(r'(?:src|href)="([^"]*)"', tag)]


def _assert_offline(html: str, folder: Path) -> None:
    for ref in _references(html):
        assert not re.match(r"^(https?:)?//", ref), f"remote reference {ref}"
        if not ref.startswith("data:"):
            assert (folder / ref).is_file(), f"missing local file {ref}"


def test_deck_is_offline_and_has_fragments(tmp_path):
    nb = synthetic_notebook()
    slide_metadata.assign(nb)
    path = write(nb, tmp_path / "99_synthetic.ipynb")
    build_slides.copy_static(tmp_path / "out")
    html = build_slides.build_deck(path, tmp_path / "out").read_text()
    _assert_offline(html, tmp_path / "out")
    assert html.count('class="dpo-step fragment"') == len(STEPS)
    assert "bt = derivation" not in html  # the derivation's code is hidden on slides
    assert "a warning" not in html and "p = 0.73" in html  # stderr dropped, stdout kept
    assert "x = 1" not in html  # the solution is skipped
    assert "NBVAL_SKIP" not in html and "colab-badge.svg" not in html
    # one flat row of slides: the right arrow reaches every one
    assert html.count("<section") == len(build_slides.lecture(nb, "99"))
    assert "<section" not in html.split("<section", 2)[-1].split("</section>")[0]


def test_a_cell_marked_skip_stays_out_of_the_deck(tmp_path):
    nb = synthetic_notebook()
    slide_metadata.assign(nb)
    nb.cells[5].metadata["slideshow"]["slide_type"] = "skip"  # set by hand
    path = write(nb, tmp_path / "99_synthetic.ipynb")
    html = build_slides.build_deck(path, tmp_path).read_text()
    assert "p = 0.73" not in html


def _pager(html: str) -> dict:
    links = BeautifulSoup(html, "html.parser").select("nav.dpo-pager a[rel]")
    return {a["rel"][0]: a["href"] for a in links}


def test_site_pages_navigation_and_handout(tmp_path):
    # numbers without a lecture plan: the home table takes the README's goal
    first = write(synthetic_notebook(), tmp_path / "91_first.ipynb")
    second_nb = synthetic_notebook()
    second_nb.cells[0].source = "# 92 · The second one"
    second = write(second_nb, tmp_path / "92_second.ipynb")
    readme = tmp_path / "README.md"
    readme.write_text("# c\n\nIntro **text**.\n\n| # | notebook | goal | hardware | run time |\n"
                      "|---|---|---|---|---|\n"
                      "| 91 | [First](notebooks/91_first.ipynb) | Learn *BT* | CPU | 1 s |\n")
    (tmp_path / "figures").mkdir()
    site = tmp_path / "site"
    pages = build_site.build([first, second], site, readme, tmp_path / "figures")
    names = sorted(p.name for p in pages)
    assert names == ["91_first.html", "92_second.html", "figures.html", "handout.html",
                     "index.html"]
    for page in pages:
        _assert_offline(page.read_text(), site)
    home = (site / "index.html").read_text()
    assert "Learn <em>BT</em>" in home and 'href="92_second.html">The second one' in home
    one = (site / "91_first.html").read_text()
    assert _pager(one) == {"next": "92_second.html"}
    assert _pager((site / "92_second.html").read_text()) == {"prev": "91_first.html"}
    assert "a warning" in one  # the site shows every committed output
    assert "IN_COLAB" not in one  # the page starts at the lesson, not at the set-up cell
    sidebar = BeautifulSoup(one, "html.parser").select_one("nav.dpo-sidebar")
    links = {a["href"] for a in sidebar.select("a")}
    assert {"https://arxiv.org/abs/2305.18290", "slides/91_first.slides.html",
            "slides/92_second.slides.html", "handout.html"} <= links
    assert any(link.startswith("https://github.com/") for link in links)
    toc = [a.get_text() for a in sidebar.select(".dpo-toc a")]
    assert toc == ["1. Bradley-Terry", "Numbers"]  # this page's own contents
    for link in links:  # every local link resolves
        if not link.startswith(("http", "#")):
            assert (site / link).is_file(), link
    handout = (site / "handout.html").read_text()
    assert handout.count('class="dpo-derivation-block"') == 2
    assert handout.count("<h3>1. Bradley-Terry</h3>") == 2  # once per notebook, not per step
    assert r"\tag{1}" in handout and 'class="dpo-step-why">Bradley-Terry<' in handout
    assert handout.count('class="dpo-context"') == 2  # one sentence of context each
    assert "@media print" in (site / "_static" / "course.css").read_text()


def test_readme_table_of_this_repository_names_every_notebook():
    rows = build_site.readme_table((ROOT / "README.md").read_text())
    notebooks = sorted(f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(rows) == notebooks
    assert all(row["goal"] and row["hardware"] for row in rows.values())
