"""Every deck and every course-site page in a real browser: headless Debian Chromium, file://.

For each deck and page: every formula is typeset (MathJax output present, no MathJax error, no
raw TeX such as $$, \\frac or \\begin{align*} left in the text a reader sees), no request goes
anywhere but file:// (or localhost), the console has no error, no local file is missing, and a
deck has exactly as many slides as its cells' metadata asks for and no derivation runs off the
edge of its slide. A derivation's steps appear one per click.

Screenshots go to DPO_COURSE_SCREENSHOTS (default build/screenshots; `make screenshots` writes
them into figures/ for the README): one slide per deck (slides_nbNN.png), the first slide that
shows each of the paper's numbered equations (slides_eqN.png, from a step's \\tag{N}), and the
home page (site_home.png).

Decks are built from copies of notebooks/ given slide metadata by scripts/slide_metadata.py (it
keeps any metadata already there), plus tests/test_site.py's synthetic notebook for the
derivation contract; the site is built from notebooks/ as they are.

Playwright drives the browser: its request, console and page-error events and its request
routing make these checks a few lines each, and it launches the system's /usr/bin/chromium
(executable_path), so it never downloads a browser. Without Chromium the tests skip, unless
DPO_COURSE_REQUIRE_BROWSER=1 (CI sets it), which makes them fail.
"""

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from test_site import STEPS, synthetic_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_site  # noqa: E402
import build_slides  # noqa: E402
import slide_metadata  # noqa: E402

CHROMIUM = os.environ.get("DPO_COURSE_CHROMIUM", "/usr/bin/chromium")
# Chromium as root in a container, and nothing in the background that would call home.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
LOCAL = re.compile(r"^(file:|data:|blob:|about:|https?://(127\.0\.0\.1|localhost)[:/])")
READY = "document.documentElement.dataset.mathjax === 'done'"
DECK_READY = READY + " && document.documentElement.dataset.deck === 'ready'"
# The text a reader sees, with typeset maths, code and scripts taken out: any TeX left in it
# was not typeset.
READER_TEXT = """() => {
  const copy = document.body.cloneNode(true);
  copy.querySelectorAll("script, style, pre, code, textarea, mjx-container").forEach(
    e => e.remove());
  return copy.textContent;
}"""
RAW_TEX = re.compile(r"\$\$|\\[A-Za-z]+|\\begin\{|\$[^$\n]{1,80}\$")
TAGS = "[...new Set([...document.querySelectorAll('.dpo-step[data-tag]')].map(e => e.dataset.tag))]"
SHOW_TAG = """{
  const at = Reveal.getIndices(document.querySelector(`.dpo-step[data-tag="${tag}"]`)
    .closest("section"));
  Reveal.slide(at.h, at.v, 1000);
}"""
# Slides (h/v) where a derivation is wider than the slide even after slides.js zoomed it out.
CUT_OFF = """() => {
  const cut = [];
  const leaves = [...document.querySelectorAll(".reveal .slides section")]
    .filter(s => !s.querySelector("section") && s.querySelector(".dpo-derivation"));
  for (const slide of leaves) {
    const at = Reveal.getIndices(slide);
    Reveal.slide(at.h, at.v, 1000);
    slide.querySelectorAll(".dpo-derivation").forEach(box => {
      const ends = [...box.querySelectorAll("svg")].map(s => s.getBoundingClientRect().right);
      if (Math.max(...ends) > box.getBoundingClientRect().right + 1) cut.push(`${at.h}/${at.v}`);
    });
  }
  return cut;
}"""
WIDER_THAN_PAPER = """() => [...document.querySelectorAll(".dpo-derivation-math svg")]
  .filter(s => s.getBoundingClientRect().right > document.documentElement.clientWidth + 1).length"""
FADE_MS = 400  # reveal.js fades a fragment in over 0.2 s: screenshots wait for it
MATH_ERRORS = """() => [...document.querySelectorAll('mjx-merror, [data-mml-node="merror"]')]
  .map(e => e.getAttribute("data-mjx-error") || e.textContent)"""


def _browser_or_skip():
    required = os.environ.get("DPO_COURSE_REQUIRE_BROWSER") == "1"
    reason = None
    if not Path(CHROMIUM).exists():
        reason = (f"no Chromium at {CHROMIUM}: on Debian/Ubuntu `apt-get install chromium`, or "
                  "set DPO_COURSE_CHROMIUM to a Chromium binary")
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is missing: pip install -e '.[site]'"
    if reason and required:
        pytest.fail(f"DPO_COURSE_REQUIRE_BROWSER=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A fresh temporary profile (user data dir) per launch is playwright's default.
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Decks of every notebook (given slide metadata) and of the synthetic one, and the sites."""
    tmp = tmp_path_factory.mktemp("instructor")
    copies = tmp / "notebooks"
    copies.mkdir()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        slide_metadata.assign(nb)
        nbformat.write(nb, copies / path.name)
    synthetic = synthetic_notebook()
    slide_metadata.assign(synthetic)
    nbformat.write(synthetic, tmp / "zz_synthetic.ipynb")

    slides = tmp / "slides"
    build_slides.main([*map(str, sorted(copies.glob("*.ipynb"))),
                       str(tmp / "zz_synthetic.ipynb"), "--out", str(slides)])
    site = build_site.build(sorted((ROOT / "notebooks").glob("*.ipynb")), tmp / "site",
                            ROOT / "README.md", ROOT / "figures")
    (tmp / "no_figures").mkdir()
    synthetic_site = build_site.build([tmp / "zz_synthetic.ipynb"], tmp / "synthetic_site",
                                      ROOT / "README.md", tmp / "no_figures")
    return {"copies": copies, "slides": slides, "site": site, "synthetic_site": synthetic_site,
            "synthetic": tmp / "zz_synthetic.ipynb"}


def _open(browser, path: Path, ready: str, problems: list[str]):
    """Open `path` from disk, recording every problem; abort any request that is not local."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.route(lambda url: not LOCAL.match(url), lambda route: route.abort())

    def request(r):
        if not LOCAL.match(r.url):
            problems.append(f"request left the machine: {r.url}")

    def failed(r):
        if LOCAL.match(r.url):  # the remote ones are reported above
            problems.append(f"request failed: {r.url} ({r.failure})")

    page.on("request", request)
    page.on("requestfailed", failed)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function(ready, timeout=30_000)
    return page


def _check_maths(page, problems: list[str], present: bool = True) -> None:
    if present and page.locator("mjx-container").count() == 0:
        problems.append("no typeset formula at all (MathJax output missing)")
    problems += [f"MathJax error: {e}" for e in page.evaluate(MATH_ERRORS)]
    text = page.evaluate(READER_TEXT)
    for match in list(RAW_TEX.finditer(text))[:5]:
        context = text[max(0, match.start() - 40):match.end() + 40].replace("\n", " ")
        problems.append(f"raw TeX in the text: {match.group(0)!r} in ...{context}...")


def _screenshot_dir() -> Path:
    folder = Path(os.environ.get("DPO_COURSE_SCREENSHOTS", ROOT / "build" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _show_one_slide(page) -> None:
    """Go to the deck's first derivation (all steps shown), else its first displayed formula,
    else its first figure, else its title."""
    page.evaluate("""() => {
      const leaves = [...document.querySelectorAll(".reveal .slides section")]
        .filter(s => !s.querySelector("section"));
      const pick = leaves.find(s => s.querySelector(".dpo-derivation"))
        || leaves.find(s => s.querySelector(".jp-RenderedLatex"))
        || leaves.find(s => s.querySelector(".jp-OutputArea-output img")) || leaves[0];
      const at = Reveal.getIndices(pick);
      Reveal.slide(at.h, at.v, 1000);
    }""")
    page.wait_for_timeout(FADE_MS)


def test_every_deck(browser, built):
    started, report, tags_shot = time.perf_counter(), {}, set()
    decks = sorted(built["slides"].glob("*.slides.html"))
    assert len(decks) == len(list((ROOT / "notebooks").glob("*.ipynb"))) + 1
    for deck in decks:
        name = deck.name.removesuffix(".slides.html")
        source = built["synthetic"] if name == "zz_synthetic" else built["copies"] / f"{name}.ipynb"
        problems: list[str] = []
        page = _open(browser, deck, DECK_READY, problems)
        _check_maths(page, problems)
        wanted = slide_metadata.expected_slides(nbformat.read(source, as_version=4))
        shown = page.evaluate("Reveal.getTotalSlides()")
        if shown != wanted:
            problems.append(f"{shown} slides, but the metadata asks for {wanted}")
        problems += [f"a derivation is cut off at the slide's edge on slide {at}"
                     for at in page.evaluate(CUT_OFF)]
        if name != "zz_synthetic":
            _show_one_slide(page)
            page.screenshot(path=_screenshot_dir() / f"slides_nb{name.split('_')[0]}.png")
            for tag in page.evaluate(TAGS):  # the paper's numbered equations, first showing
                if tag not in tags_shot and re.fullmatch(r"[\w.-]+", tag):
                    tags_shot.add(tag)
                    page.evaluate(f"tag => {SHOW_TAG}", tag)
                    page.wait_for_timeout(FADE_MS)
                    page.screenshot(path=_screenshot_dir() / f"slides_eq{tag}.png")
        page.close()
        report[deck.name] = problems
    print(f"{len(decks)} decks checked in {time.perf_counter() - started:.1f} s")
    assert not any(report.values()), {k: v for k, v in report.items() if v}


def test_every_site_page(browser, built):
    started, report = time.perf_counter(), {}
    pages = [*built["site"], *built["synthetic_site"]]
    for path in pages:
        problems: list[str] = []
        page = _open(browser, path, READY, problems)
        # Notebook pages and a handout with derivations must show typeset maths; every page
        # must have no untypeset TeX.
        empty_handout = path.name == "handout.html" and "No notebook displays" in page.content()
        _check_maths(page, problems, present=path.name not in ("index.html", "figures.html")
                     and not empty_handout)
        if path.name == "handout.html":  # on A4 paper (182 mm between the margins)
            page.emulate_media(media="print")
            page.set_viewport_size({"width": 688, "height": 1000})
            wide = page.evaluate(WIDER_THAN_PAPER)
            if wide:
                problems.append(f"{wide} handout formulas are wider than the printed page")
        if path.name == "index.html" and path.parent.name == "site":
            page.screenshot(path=_screenshot_dir() / "site_home.png")
        if path.name == "figures.html":
            broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).length")
            if broken:
                problems.append(f"{broken} figures did not load")
        page.close()
        report[f"{path.parent.name}/{path.name}"] = problems
    print(f"{len(pages)} site pages checked in {time.perf_counter() - started:.1f} s")
    assert not any(report.values()), {k: v for k, v in report.items() if v}


def test_derivation_steps_appear_one_click_at_a_time(browser, built):
    problems: list[str] = []
    page = _open(browser, built["slides"] / "zz_synthetic.slides.html", DECK_READY, problems)
    page.evaluate("""() => {
      const at = Reveal.getIndices(document.querySelector(".dpo-derivation").closest("section"));
      Reveal.slide(at.h, at.v, -1);
    }""")
    visible = "document.querySelectorAll('.dpo-step.visible').length"
    assert page.evaluate(visible) == 0
    assert page.locator(".dpo-step").count() == len(STEPS)
    for shown in range(1, len(STEPS) + 1):
        page.evaluate("Reveal.nextFragment()")
        assert page.evaluate(visible) == shown
        step = page.locator(f'.dpo-step[data-step="{shown}"]')
        assert step.locator("mjx-container").count() == 1  # one typeset align* per step
    assert "(1)" in page.locator('.dpo-step[data-step="1"]').inner_text()  # \tag{1} typeset
    handout = built["synthetic_site"][0].parent / "handout.html"
    handout_page = _open(browser, handout, READY, problems)
    assert handout_page.locator(".dpo-derivation-block mjx-container").count() == 1
    assert not problems, problems
