"""Every deck and every course-site page in a real browser: headless Debian Chromium, file://.

For each deck and page: every formula is typeset (MathJax output present, no MathJax error, no
raw TeX such as $$, \\frac or \\begin{align*} left in the text a reader sees), no request goes
anywhere but file:// (or localhost), the console has no error and no local file is missing.

Each real deck is shown at 1280x720, as projected, and:
- stepped from its first slide to its last with the keys a clicker sends (right arrow, Space,
  PageDown, in turn): each press must show the next derivation step or the next slide, and
  every slide and every fragment must be reached; there are no vertical stacks to skip;
- every slide, all its steps shown, must fit the screen: not taller, not wider, no table,
  code block or formula spilling past the edge;
- every slide has a heading; prose is at least 28 px on screen and code smaller than prose;
  no derivation is scaled down; nothing but the derivation shows before its first step;
- the deck opens with a title slide (the lecture number, the DPO paper and its authors) and
  an outline, has a motivating example and a recap, and closes with a summary and the
  references; it shows at most a few code slides, no plotting code, and no run times, set-up
  or checks.

Each site page is checked at 1280x800 and at phone width (390 px: nothing wider than the
screen): its sidebar links the paper, the repository and the decks, every local link leads to
a file, a notebook page lists its own contents and starts at the lesson, the home table's goals
have typeset maths, and the handout on A4 paper has no formula wider than the page or shrunk.

Screenshots go to DPO_COURSE_SCREENSHOTS (default build/screenshots; `make screenshots` writes
them into figures/ for the README): one slide per deck (slides_nbNN.png), the first slide that
shows each of the paper's numbered equations (slides_eqN.png, from a step's \\tag{N}), deck
02's title slide (slides_title.png) and the home page (site_home.png).

Decks and sites are built from notebooks/ as they are, plus tests/test_site.py's synthetic
notebook for the derivation contract.

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
from urllib.parse import unquote, urlparse

import nbformat
import pytest
from helpers import STEPS, synthetic_notebook

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
# Every slide with all its fragments shown: what spills over the 1280x720 slide (taller or
# wider, a table or code block wider than its box, a formula past the slide's edge), its
# heading, the smallest prose and the largest code font in screen pixels, and any zoom.
MEASURE = """() => {
  const scale = Reveal.getScale(), out = [];
  const px = e => parseFloat(getComputedStyle(e).fontSize) * scale;
  Reveal.getSlides().forEach((slide, index) => {
    const at = Reveal.getIndices(slide);
    Reveal.slide(at.h, at.v, slide.querySelectorAll(".fragment").length - 1);
    const box = slide.getBoundingClientRect();
    const shown = [...slide.querySelectorAll("*")].filter(e => !e.closest("aside"));
    const spills = shown.filter(e => e.scrollWidth > e.clientWidth + 1
      && getComputedStyle(e).overflowX !== "visible" && !e.tagName.startsWith("MJX-"));
    const outside = shown.filter(e => e.tagName === "svg" || e.tagName === "IMG"
      || e.tagName === "TABLE").filter(e => {
        const r = e.getBoundingClientRect();
        return r.right > box.right + 1 || r.bottom > box.bottom + 1;
      });
    const prose = shown.filter(e => ["P", "LI"].includes(e.tagName) && !e.closest("table")
      && e.textContent.trim());
    const code = shown.filter(e => e.tagName === "PRE");
    const heading = slide.querySelector(":scope > h1, :scope > h2");
    out.push({
      index, kind: slide.dataset.kind, fragments: slide.querySelectorAll(".fragment").length,
      tall: slide.scrollHeight > slide.clientHeight + 1 ? slide.scrollHeight : 0,
      wide: slide.scrollWidth > slide.clientWidth + 1 ? slide.scrollWidth : 0,
      spills: spills.map(e => e.tagName).concat(outside.map(e => e.tagName + " past the edge")),
      heading: heading ? heading.textContent.trim() : "",
      prose: prose.length ? Math.min(...prose.map(px)) : null,
      code: code.length ? Math.max(...code.map(px)) : null,
      maths: [...slide.querySelectorAll(".dpo-step-math mjx-container")].map(px),
      zoomed: [...slide.querySelectorAll(".dpo-derivation, .dpo-derivation *")].filter(
        e => !e.closest("svg") && (getComputedStyle(e).zoom !== "1"
          || getComputedStyle(e).transform !== "none")).length,
      height: Math.round(Math.max(0, ...[...slide.children].filter(e => e.tagName !== "ASIDE")
        .map(e => e.getBoundingClientRect().bottom - box.top)) / scale),  // content, slide px
      apart: [...slide.querySelectorAll(".dpo-step")].filter(step => {
        const why = step.querySelector(".dpo-step-why");
        const maths = step.querySelector(".dpo-step-math mjx-container");
        if (!why || !why.textContent.trim() || !maths) return false;
        const w = why.getBoundingClientRect(), m = maths.getBoundingClientRect();
        return w.left < m.left || w.top > m.bottom || w.bottom < m.top;  // not beside its step
      }).length,
      text: [...slide.children].filter(e => e.tagName !== "ASIDE").map(e => e.textContent)
        .join(" "),
      before: slide.querySelector(".dpo-step") ? [...slide.children].filter(
        e => !["H2", "ASIDE"].includes(e.tagName) && !e.classList.contains("dpo-derivation"))
        .length : 0,
    });
  });
  Reveal.slide(0, 0, -1);
  return out;
}"""
STATE = """(() => {
  const i = Reveal.getIndices();
  return [i.h, i.v, i.f === undefined ? -1 : i.f];
})()"""
MIN_PROSE_PX = 28  # at 1280x720, on screen
MAX_CODE_SLIDES = 3  # code only where it is the point (the loss, the DPO step)
MIN_NOTES = 3  # slides with speaker notes in a real deck: the prose that would crowd slides
# A fraction in an exponent typesets tiny: a deck writes such an exponent as exp(...).
TINY_EXPONENT = re.compile(r"(?<![\\A-Za-z])e\^\{[^}]*\\frac")
# What belongs to running a notebook, not to a lecture.
OUT_OF_DECKS = re.compile(r"run time|pip install|NBVAL|Open in Colab|\bassert\b|import ",
                          re.IGNORECASE)
KEYS = ("ArrowRight", "Space", "PageDown")  # what a clicker may send: each must do the same
WIDER_THAN_PAPER = """() => [...document.querySelectorAll(".dpo-derivation-math svg")]
  .filter(s => s.getBoundingClientRect().right > document.documentElement.clientWidth + 1).length"""
# Formulas that print smaller than MathJax set them (a max-width squeezing the svg).
SHRUNK = """() => [...document.querySelectorAll(".dpo-derivation-math svg[width$='ex']")]
  .filter(s => s.getBoundingClientRect().width < 0.99 * s.width.baseVal.value).length"""
CROWDED = """() => [...document.querySelectorAll(".dpo-step")].filter(step => {
  const why = step.querySelector(".dpo-step-why");
  if (!why || !why.textContent.trim()) return false;
  const w = why.getBoundingClientRect();
  return [...step.querySelectorAll(".dpo-step-math svg[width$='ex']")].some(svg => {
    const m = svg.getBoundingClientRect();  // the maths and its reason overlap
    return m.right > w.left + 1 && m.left < w.right - 1 && m.bottom > w.top + 1
      && m.top < w.bottom - 1;
  });
}).length"""
SMALLEST_TEXT = """() => Math.min(...[...document.querySelectorAll(".dpo-content p, .dpo-step-why")]
  .map(e => parseFloat(getComputedStyle(e).fontSize)))"""
LOCAL_LINKS = "[...document.links].map(a => a.href).filter(h => h.startsWith('file:'))"
SIDEBAR = """() => {
  const side = document.querySelector("nav.dpo-sidebar");
  const links = side ? [...side.querySelectorAll("a")].map(a => a.getAttribute("href")) : [];
  const main = document.querySelector("main");
  const firstHeading = main && main.querySelector("h2");
  const firstCode = main && main.querySelector(".jp-CodeCell");
  return {
    paper: links.includes("https://arxiv.org/abs/2305.18290"),
    repo: links.some(l => l.startsWith("https://github.com/")),
    decks: links.filter(l => l.endsWith(".slides.html")).length,
    this_deck: !!(side && side.querySelector("a.dpo-this-deck")),
    toc: side ? side.querySelectorAll(".dpo-toc a").length : 0,
    headings: main ? main.querySelectorAll("h2[id], h3[id]").length : 0,
    code_before_lesson: !!(firstCode && firstHeading
      && firstCode.compareDocumentPosition(firstHeading) & Node.DOCUMENT_POSITION_FOLLOWING),
    table_maths: document.querySelectorAll("table.dpo-notebooks mjx-container").length,
  };
}"""
PHONE_WIDTH = 390
README_DECK = "02"  # the deck whose title slide the README shows
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
    """Decks of every notebook and of the synthetic one, and the sites (with their decks)."""
    tmp = tmp_path_factory.mktemp("instructor")
    synthetic = synthetic_notebook()
    slide_metadata.assign(synthetic)
    nbformat.write(synthetic, tmp / "zz_synthetic.ipynb")
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    slides = tmp / "slides"
    build_slides.main([*map(str, notebooks), str(tmp / "zz_synthetic.ipynb"), "--out",
                       str(slides)])
    site = build_site.build(notebooks, tmp / "site", ROOT / "README.md", ROOT / "figures")
    (tmp / "no_figures").mkdir()
    synthetic_site = build_site.build([tmp / "zz_synthetic.ipynb"], tmp / "synthetic_site",
                                      ROOT / "README.md", tmp / "no_figures")
    sources = {p.stem: p for p in [*notebooks, tmp / "zz_synthetic.ipynb"]}
    return {"slides": slides, "site": site, "synthetic_site": synthetic_site,
            "synthetic": tmp / "zz_synthetic.ipynb", "sources": sources}


def _open(browser, path: Path, ready: str, problems: list[str], viewport: dict | None = None):
    """Open `path` from disk, recording every problem; abort any request that is not local."""
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 720})
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
        || leaves.find(s => s.querySelector(".dpo-maths"))
        || leaves.find(s => s.querySelector(".dpo-figure img")) || leaves[0];
      const at = Reveal.getIndices(pick);
      Reveal.slide(at.h, at.v, 1000);
    }""")
    page.wait_for_timeout(FADE_MS)


def _step_through(page) -> list[str]:
    """Press the clicker's keys in turn from the first slide to the last: each press must show
    the next fragment or, after a slide's last fragment, the next slide at its first."""
    problems, state, presses = [], page.evaluate(STATE), 0
    counts = page.evaluate("Reveal.getSlides().map(s => s.querySelectorAll('.fragment').length)")
    seen = {(0, -1)}
    while presses < 2000:
        key = KEYS[presses % len(KEYS)]
        page.keyboard.press(key)
        presses += 1
        after = page.evaluate(STATE)
        h, _, f = state
        wanted = [h, 0, f + 1] if f + 1 < counts[h] else [h + 1, 0, -1]
        if after == state:
            break
        if after != wanted:
            problems.append(f"{key} went from {state} to {after}, not to {wanted}")
            break
        seen.add((after[0], after[2]))
        state = after
    missed = [f"{h}/{f}" for h, n in enumerate(counts) for f in range(-1, n) if (h, f) not in seen]
    if missed:
        problems.append(f"never reached by the keys (slide/fragment): {missed[:8]}")
    return problems


def _check_slides(page, slides: list[dict], name: str) -> tuple[list[str], list[dict]]:
    """Overflow, headings, font sizes, title and closing slides, what stays out of a deck."""
    problems, measured = [], page.evaluate(MEASURE)
    prose = min((m["prose"] for m in measured if m["prose"]), default=MIN_PROSE_PX)
    for m, slide in zip(measured, slides):
        at = f"slide {m['index'] + 1} ({m['heading'][:40]!r})"
        if m["tall"] or m["wide"] or m["spills"]:
            problems.append(f"{at} overflows: {m['tall']} px tall, {m['wide']} px wide, "
                            f"spilling {m['spills'][:3]}")
        if not m["heading"]:
            problems.append(f"{at} has no heading")
        if m["prose"] is not None and m["prose"] < MIN_PROSE_PX:
            problems.append(f"{at}: prose at {m['prose']:.1f} px")
        if m["code"] is not None and m["code"] >= prose:
            problems.append(f"{at}: code ({m['code']:.1f} px) as large as prose ({prose:.1f} px)")
        if any(px < MIN_PROSE_PX for px in m["maths"]) or m["zoomed"]:
            problems.append(f"{at}: a derivation is scaled down (zoomed: {m['zoomed']} "
                            f"elements; maths at {min(m['maths'], default=0):.1f} px)")
        if m["apart"]:
            problems.append(f"{at}: {m['apart']} step reasons are not beside their steps")
        if m["before"]:
            problems.append(f"{at}: something besides the derivation shows before its steps")
        if OUT_OF_DECKS.search(m["text"].replace(name, "")):
            problems.append(f"{at}: {OUT_OF_DECKS.search(m['text']).group(0)!r} on a slide")
    kinds = [m["kind"] for m in measured]
    closing = kinds[kinds.index("summary"):] if "summary" in kinds else []
    if kinds[:2] != ["title", "outline"] or set(closing[1:]) != {"references"}:
        problems.append(f"the deck opens with {kinds[:2]} and closes with {closing}")
    if name != "zz_synthetic" and not {"motivation", "recap"} <= set(kinds):
        problems.append("no motivating example or no recap of the key equations")
    number = name.split("_")[0]
    title = measured[0]["text"]
    for wanted in ("Rafailov", "Finn", "2305.18290", f"Lecture {number.lstrip('0')}"):
        if number.isdigit() and wanted not in title:
            problems.append(f"the title slide does not name {wanted!r}")
    references = " ".join(m["text"] for m in measured if m["kind"] == "references")
    if number.isdigit() and "2305.18290" not in references:
        problems.append("the references do not cite the DPO paper")
    if name != "zz_synthetic" and page.locator("aside.notes").count() < MIN_NOTES:
        problems.append("hardly any speaker notes")
    code = page.locator("pre.dpo-code").count()
    if code > MAX_CODE_SLIDES or "plt." in page.evaluate("document.body.textContent"):
        problems.append(f"{code} code slides (plotting code included?)")
    return problems, measured


def test_every_deck(browser, built):
    started, report, tags_shot, sizes = time.perf_counter(), {}, set(), []
    decks = sorted(built["slides"].glob("*.slides.html"))
    assert len(decks) == len(list((ROOT / "notebooks").glob("*.ipynb"))) + 1
    for deck in decks:
        name = deck.name.removesuffix(".slides.html")
        nb = nbformat.read(built["sources"][name], as_version=4)
        slides = build_slides.lecture(nb, name.split("_")[0])
        problems: list[str] = []
        page = _open(browser, deck, DECK_READY, problems)
        _check_maths(page, problems)
        shown = page.evaluate("Reveal.getTotalSlides()")
        if shown != len(slides):
            problems.append(f"{shown} slides, but the lecture has {len(slides)}")
        if page.locator(".slides > section > section").count():
            problems.append("vertical stacks: the right arrow would skip them")
        if TINY_EXPONENT.search(deck.read_text(encoding="utf-8")):
            problems.append("a fraction in an exponent: write it as exp(...)")
        found, measured = _check_slides(page, slides, name)
        problems += found
        sizes += [(m["height"], m["prose"] or 99, name, m["index"]) for m in measured]
        problems += _step_through(page)
        if name != "zz_synthetic":
            _screenshots(page, name, tags_shot)
        page.close()
        report[deck.name] = problems
    print(f"{len(decks)} decks, {len(sizes)} slides checked in "
          f"{time.perf_counter() - started:.1f} s; tallest content {max(sizes)[0]} px "
          f"(of 720, deck {max(sizes)[2]} slide {max(sizes)[3] + 1}), "
          f"smallest prose {min(s[1] for s in sizes):.1f} px")
    for deck, problems in report.items():
        print("\n".join(f"{deck}: {problem}" for problem in problems))
    assert not any(report.values()), {k: v for k, v in report.items() if v}


def _screenshots(page, name: str, tags_shot: set) -> None:
    """The deck's first derivation (all steps shown), the first slide of each of the paper's
    equations, and the README deck's title slide."""
    folder = _screenshot_dir()
    number = name.split("_")[0]
    if number == README_DECK:
        page.evaluate("Reveal.slide(0, 0, -1)")
        page.wait_for_timeout(FADE_MS)
        page.screenshot(path=folder / "slides_title.png")
    _show_one_slide(page)
    page.screenshot(path=folder / f"slides_nb{number}.png")
    for tag in page.evaluate(TAGS):  # the paper's numbered equations, first showing
        if tag not in tags_shot and re.fullmatch(r"[\w.-]+", tag):
            tags_shot.add(tag)
            page.evaluate(f"tag => {SHOW_TAG}", tag)
            page.wait_for_timeout(FADE_MS)
            page.screenshot(path=folder / f"slides_eq{tag}.png")


def _check_page(page, path: Path, decks: int) -> list[str]:
    """Sidebar, page contents, links, where the page starts, and the home table's maths."""
    problems = []
    missing = [href for href in page.evaluate(LOCAL_LINKS)
               if not Path(unquote(urlparse(href).path)).is_file()]
    problems += [f"a link leads nowhere: {href}" for href in missing[:5]]
    side = page.evaluate(SIDEBAR)
    if not side["paper"] or not side["repo"] or side["decks"] < decks:
        problems.append(f"the sidebar lacks the paper, the repository or the decks: {side}")
    if path.name == "index.html" and path.parent.name == "site" and not side["table_maths"]:
        problems.append("the home table has no typeset maths")
    if path.stem[:2].isdigit():
        if side["toc"] != side["headings"] or not side["toc"]:
            problems.append(f"contents list {side['toc']} entries for {side['headings']} headings")
        if side["code_before_lesson"]:
            problems.append("the page opens on set-up code, not on the lesson")
        if not side["this_deck"]:
            problems.append("no link to this lecture's slides")
    return problems


def _check_phone(page) -> list[str]:
    page.set_viewport_size({"width": PHONE_WIDTH, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    return [f"{width} px wide on a {PHONE_WIDTH} px phone"] if width > PHONE_WIDTH + 1 else []


def _check_print(page) -> list[str]:
    """The handout on A4 paper (182 mm between the margins): nothing wider than the paper,
    nothing shrunk to fit, text at a readable size."""
    page.emulate_media(media="print")
    page.set_viewport_size({"width": 688, "height": 1000})
    problems = []
    wide = page.evaluate(WIDER_THAN_PAPER)
    if wide:
        problems.append(f"{wide} handout formulas are wider than the printed page")
    crowded = page.evaluate(CROWDED)
    if crowded:
        problems.append(f"{crowded} handout steps run into their reasons")
    shrunk = page.evaluate(SHRUNK)
    if shrunk:
        problems.append(f"{shrunk} handout formulas are shrunk below their size")
    smallest = page.evaluate(SMALLEST_TEXT)
    if smallest < 13:  # 10 pt
        problems.append(f"handout text at {smallest} px")
    return problems


def test_every_site_page(browser, built):
    started, report = time.perf_counter(), {}
    pages = [*built["site"], *built["synthetic_site"]]
    for path in pages:
        problems: list[str] = []
        page = _open(browser, path, READY, problems, {"width": 1280, "height": 800})
        # Notebook pages and a handout with derivations must show typeset maths; every page
        # must have no untypeset TeX.
        empty_handout = path.name == "handout.html" and "No notebook displays" in page.content()
        _check_maths(page, problems, present=path.name not in ("index.html", "figures.html")
                     and not empty_handout)
        site = built["site"] if path in built["site"] else built["synthetic_site"]
        problems += _check_page(page, path, sum(p.stem[:2].isdigit() for p in site))
        if path.name == "index.html" and path.parent.name == "site":
            page.screenshot(path=_screenshot_dir() / "site_home.png")
        if path.name == "figures.html":
            broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).length")
            if broken:
                problems.append(f"{broken} figures did not load")
        problems += _check_phone(page)
        if path.name == "handout.html":
            problems += _check_print(page)
        page.close()
        report[f"{path.parent.name}/{path.name}"] = problems
    print(f"{len(pages)} site pages checked in {time.perf_counter() - started:.1f} s")
    for name, problems in report.items():
        print("\n".join(f"{name}: {problem}" for problem in problems))
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
        assert step.locator(".dpo-step-math mjx-container").count() == 1  # one align* a step
    assert "(1)" in page.locator('.dpo-step[data-step="1"]').text_content()  # \tag{1} typeset
    handout = built["synthetic_site"][0].parent / "handout.html"
    handout_page = _open(browser, handout, READY, problems)
    assert handout_page.locator(".dpo-derivation-block .dpo-step-math mjx-container").count() \
        == len(STEPS)
    assert not problems, problems
