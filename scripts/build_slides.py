"""Build one lecture deck per notebook: `make slides` writes build/slides/NAME.slides.html.

    python scripts/build_slides.py [NOTEBOOK ...] [--out build/slides]

A deck is a lecture made from a notebook's committed outputs (nothing is executed), not the
notebook cut into pages. Its order: a title slide (the lecture, the DPO paper and its authors,
the lecture number), an outline, a motivating example, the learning goals, the notebook's
sections, a recap of the key equations, a summary and the references. scripts/deck_plan.py
holds what a notebook cannot say (the example, the recap, the summary, the references).

How a notebook becomes slides, decided by each cell's content, so that cells may move:
- every slide is titled by the section heading it sits under, and the deck is flat (no
  vertical stacks), so that the right arrow, Space and PageDown all step through every slide
  and every derivation step alike (a clicker sends any one of them);
- prose is packed under its heading in the room a 1280x720 slide has at 30 px (deck.css);
  a long paragraph or list item shows its first sentence, and its full text goes to the
  speaker notes (press S);
- code is hidden except in the cells the plan names (the code is the point there); set-up,
  timing and check cells (asserts) and their outputs stay out, as do exercise solutions and
  cells whose slide type (metadata.slideshow.slide_type) is skip;
- a figure gets a slide of its own, full width; a table or printout that would not fit goes
  to the notes;
- a derivation gets slides of its own, a few steps each (none is ever scaled down), one step
  per click, each step's reason beside it, long exponents written as exp(...), and a right
  side too wide for the slide broken at its top-level + and - signs.

The contract with the course's derivation helper: a derivation is a display_data output whose
output metadata is {"dpo_course": {"derivation_steps": [line, ...]}}, each line
`lhs &= rhs && reason` (a line may start at `&=` and carry \\tag{n}).

The decks open from disk (file://) with no network: reveal.js 5 comes from sphinx-revealjs and
MathJax 3 from django-static-mathjax, both Python packages of the `site` extra, copied into the
output's _static/ folder.
"""

import argparse
import ast
import html
import importlib.util
import math
import re
import shutil
import sys
from pathlib import Path

import jinja2
import nbformat
from nbconvert.filters import markdown2html
from nbconvert.preprocessors import Preprocessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deck_plan import LECTURES, PAPER, REFERENCES  # noqa: E402
from slide_metadata import DERIVATION_KEY, slide_type  # noqa: E402

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

# The slide's room, in CSS pixels of the 1280x720 slide (deck.css): what is left under the
# heading, and the height of one line of prose, of a list item and of code.
ROOM = 540
PROSE_LINE, CHARS_PER_LINE = 40, 68
CODE_LINE, CODE_COLUMNS, CODE_FIT = 27, 84, 22
TABLE_CHARS = 700  # characters of a table that fit on a slide at 22 px
SHORT = 190  # characters of prose that stay on a slide; a longer paragraph shows a sentence
# A derivation step's maths column, in ems of the maths font (deck.css), and its rows' heights.
MATH_EMS = 25.0
STEPS_PER_SLIDE = 4
LONG_LHS = 0.4  # a left side wider than this share of the maths column: rhs on the next line
REFS_PER_SLIDE = 4
ORPHAN = 60  # characters: a lead-in this short does not get a slide of its own
DISPLAY_EMS = 38.0  # a displayed formula in prose: the slide's whole width
# Title-cell lines that are about running the notebook, not about the lecture.
RUN_INFO = re.compile(r"^\*\*(Run time|Hardware|How to read)|colab", re.IGNORECASE)
# Prose about the notebook's own checks and test runs: not lecture material.
CHECK_PROSE = re.compile(r"\bnbval\b|\bassert|\btests?/|^\*\*Check\b", re.IGNORECASE)
TIMING = re.compile(r"run time|perf_counter|get_num_threads")


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


# ---- LaTeX: reading a step, its width, and rewriting it for a slide ---------------------------

def _group(tex: str, i: int) -> tuple[str, int]:
    """The braced group (or single token) at tex[i:], and the index after it."""
    while i < len(tex) and tex[i] == " ":
        i += 1
    if i >= len(tex):
        return "", i
    if tex[i] != "{":
        token = re.match(r"\\[A-Za-z]+|\\.|.", tex[i:]).group(0)
        return token, i + len(token)
    depth, j = 0, i
    while j < len(tex):
        if tex[j] == "\\":
            j += 2
            continue
        depth += {"{": 1, "}": -1}.get(tex[j], 0)
        if depth == 0:
            return tex[i + 1:j], j + 1
        j += 1
    return tex[i + 1:], len(tex)


NARROW = {"left": 0.3, "right": 0.3, "big": 0.4, "Big": 0.5, "bigg": 0.5, "Bigg": 0.6,
          ",": 0.17, ";": 0.28, "!": 0, "quad": 1.0, "qquad": 2.0, "mid": 0.6, "cdot": 0.5}
STYLE = ("mathrm", "mathbb", "mathcal", "operatorname", "hat", "tilde", "bar", "boldsymbol")


def tex_width(tex: str) -> float:
    """A rough width of typeset LaTeX, in ems: enough to decide where a line must break."""
    total, i = 0.0, 0
    while i < len(tex):
        char = tex[i]
        if char == "\\":
            name = re.match(r"\\([A-Za-z]+|.)", tex[i:]).group(1)
            i += len(name) + 1
            if name == "frac":
                top, i = _group(tex, i)
                bottom, i = _group(tex, i)
                total += max(tex_width(top), tex_width(bottom)) + 0.3
            elif name == "text":
                words, i = _group(tex, i)
                total += 0.5 * len(words)
            elif name in NARROW:
                total += NARROW[name]
                if name in ("left", "right", "big", "Big", "bigg", "Bigg"):
                    i += 1 + (tex[i:i + 1] == "\\")  # the delimiter that follows
            elif name in STYLE:
                continue
            elif name in ("log", "exp", "lim", "sum", "max", "min", "sigma"):
                total += 0.5 * len(name) if name != "sigma" else 0.6
            else:
                total += 0.7
        elif char in "^_":
            script, i = _group(tex, i + 1)
            total += 0.7 * tex_width(script)
        elif char == "{":
            inner, i = _group(tex, i)
            total += tex_width(inner)
        else:
            total += {" ": 0, "}": 0, "&": 0, "=": 1.1, "+": 1.0, "-": 1.0}.get(
                char, 0.55 if char.isalnum() else 0.4)
            i += 1
    return total


LONG_EXPONENT = re.compile(r"(?<![\\A-Za-z])e\^\{")


def exp_form(tex: str) -> str:
    """`e^{...}` with a long or fractional exponent as `\\exp\\left(...\\right)`: the exponent
    is then typeset at full size rather than as a tiny superscript."""
    out, i = [], 0
    for match in LONG_EXPONENT.finditer(tex):
        if match.start() < i:
            continue
        exponent, end = _group(tex, match.end() - 1)
        out.append(tex[i:match.start()])
        if r"\frac" in exponent or tex_width(exponent) > 3:
            out.append(rf"\exp\left({exp_form(exponent)}\right)")
        else:
            out.append(f"e^{{{exp_form(exponent)}}}")
        i = end
    out.append(tex[i:])
    return "".join(out)


def _top_level(tex: str, separators: tuple[str, ...]) -> list[int]:
    """Where a separator occurs outside every brace and \\left...\\right pair."""
    found, depth, i = [], 0, 0
    while i < len(tex):
        if tex.startswith(("\\left", "\\begin"), i):
            depth += 1
        elif tex.startswith(("\\right", "\\end"), i):
            depth -= 1
        elif tex[i] == "{" and tex[i - 1:i] != "\\":
            depth += 1
        elif tex[i] == "}" and tex[i - 1:i] != "\\":
            depth -= 1
        elif depth == 0 and tex.startswith(separators, i):
            found.append(i)
        i += 1
    return found


def split_step(step: str) -> dict:
    """A step `lhs &= rhs && reason \\tag{n}` as its parts (lhs empty for `&= rhs`)."""
    tag = re.search(r"\\tag\*?\{([^}]*)\}", step)
    body = step.replace(tag.group(0), "") if tag else step
    reason_at = _top_level(body, ("&&",))
    reason = body[reason_at[0] + 2:].strip() if reason_at else ""
    maths = body[:reason_at[0]] if reason_at else body
    amp = _top_level(maths, ("&",))
    lhs, rhs = (maths[:amp[0]], maths[amp[0] + 1:]) if amp else ("", maths)
    return {"lhs": lhs.strip(), "rhs": rhs.strip(), "reason": reason,
            "tag": tag.group(1) if tag else None}


def _pieces(tex: str) -> list[str]:
    cuts = [0, *_top_level(tex, (" + ", " - ")), len(tex)]
    return [tex[a:b].strip() for a, b in zip(cuts, cuts[1:]) if tex[a:b].strip()]


def _unpaired(tex: str) -> str:
    """Parentheses as fixed-size \\bigl( \\bigr): unlike \\left( \\right) they may open on
    one line and close on the next, so a sum inside them can break."""
    size = "Big" if r"\frac" in tex else "big"
    return (tex.replace(r"\left(", rf"\{size}l(").replace(r"\right)", rf"\{size}r)")
            .replace(r"\left[", rf"\{size}l[").replace(r"\right]", rf"\{size}r]"))


def break_lines(lhs: str, rhs: str, room: float = MATH_EMS) -> list[str]:
    """The right side cut at its top-level + and - signs into lines that fit `room` ems."""
    pieces = [inner for piece in _pieces(rhs)
              for inner in (_pieces(_unpaired(piece)) if tex_width(piece) > room else [piece])]
    if len(pieces) > 1 and pieces[0] == "=":  # "= -x": the minus is a sign, not a break
        pieces[:2] = [f"= {pieces[1]}"]
    lines, width = [""], tex_width(lhs) + 1.2
    for piece in pieces:
        if lines[-1] and width + tex_width(piece) > room:
            lines.append("")
            width = 2.0  # the indent of a continued line
        lines[-1] = f"{lines[-1]} {piece}".strip()
        width += tex_width(piece)
    return lines


def reason_html(reason: str) -> str:
    r"""A step's reason as HTML: \text{...} as words (they wrap), the rest as inline maths."""
    out, i = [], 0
    for match in re.finditer(r"\\text\{", reason):
        if match.start() < i:
            continue
        words, end = _group(reason, match.end() - 1)
        out += [_inline_maths(reason[i:match.start()]), html.escape(words)]
        i = end
    out.append(_inline_maths(reason[i:]))
    return "".join(out).strip()


def _inline_maths(tex: str) -> str:
    return rf"\({html.escape(tex.strip(), quote=False)}\)" if tex.strip() else " "


def frac_depth(tex: str) -> int:
    """How deep fractions nest in `tex` (0: none)."""
    depth, i = 0, 0
    while (at := tex.find(r"\frac", i)) >= 0:
        top, after = _group(tex, at + 5)
        bottom, i = _group(tex, after)
        depth = max(depth, 1 + frac_depth(top), 1 + frac_depth(bottom))
    return depth


def _rows_height(latex: str, lines: int) -> int:
    """Pixels one typeset step takes: taller with fractions, much taller when they nest."""
    nested = frac_depth(latex) > 1 or "splitdfrac" in latex or r"\begin{matrix}" in latex
    row = 175 if nested else 100 if r"\frac" in latex else 64
    return row * lines + 10


def split_fraction(line: str, room: float = MATH_EMS) -> str:
    """A line that is one fraction too wide for the slide, with its wider part (numerator or
    denominator) typeset on two lines at a top-level + or - (mathtools' \\splitdfrac)."""
    match = re.match(r"^(=\s*)?\\frac\{", line)
    if not match or tex_width(line) <= room:
        return line
    top, after = _group(line, match.end() - 1)
    bottom, end = _group(line, after)
    parts = [top, bottom]
    wide = 0 if tex_width(top) > tex_width(bottom) else 1
    cuts = _top_level(parts[wide], (" + ", " - "))
    if not cuts:
        return line
    cut = min(cuts, key=lambda c: abs(c - len(parts[wide]) / 2))
    parts[wide] = rf"\splitdfrac{{{parts[wide][:cut]}}}{{{parts[wide][cut:].strip()}}}"
    return f"{match.group(1) or ''}\\frac{{{parts[0]}}}{{{parts[1]}}}{line[end:]}"


def step_html(step: str, number: int, lhs: str, room: float = MATH_EMS) -> tuple[str, int]:
    """One step as a fragment (maths left, reason right) and the height it takes.

    A step that continues the previous one (`&= ...`) gets `lhs` when it opens a slide, so a
    continued derivation restates what it is equal to.
    """
    parts = split_step(exp_form(step))
    left = parts["lhs"] or lhs
    if tex_width(left) > LONG_LHS * room:  # a long left side gets a line of its own
        lines = break_lines("", parts["rhs"], room - 2)
        rows = [f"&{left}", *(rf"&\qquad {line}" for line in lines)]
    else:
        lines = break_lines(left, parts["rhs"], room)
        lines[0] = split_fraction(lines[0], room - tex_width(left))
        rows = [f"{left} &{lines[0]}", *(rf"&\quad {line}" for line in lines[1:])]
    tag = rf" \tag{{{parts['tag']}}}" if parts["tag"] else ""
    latex = r"\begin{align*} " + r" \\ ".join(rows) + tag + r" \end{align*}"
    data_tag = f' data-tag="{html.escape(parts["tag"])}"' if parts["tag"] else ""
    why = reason_html(parts["reason"]) if parts["reason"] else ""
    # a line that still does not fit: its reason goes under it (the handout; on a slide the
    # browser test fails on it)
    wide = " dpo-step-wide" if max(map(tex_width, rows)) > room + 1 else ""
    block = (f'<div class="dpo-step{wide} fragment" data-step="{number}"{data_tag}>'
             f'<div class="dpo-step-math">{html.escape(latex, quote=False)}</div>'
             f'<div class="dpo-step-why">{why}</div></div>')
    return block, _rows_height(latex, len(rows))


def derivation_chunks(steps: list[str]) -> list[str]:
    """The steps as one or more slide bodies, each within the slide's room."""
    first_lhs = split_step(exp_form(steps[0]))["lhs"]
    chunks, current, used = [], [], 0
    for number, step in enumerate(steps, start=1):
        opens = not current
        block, height = step_html(step, number, first_lhs if opens else "")
        if current and (used + height > ROOM or len(current) == STEPS_PER_SLIDE):
            chunks.append(current)
            block, height = step_html(step, number, first_lhs)
            current, used = [], 0
        current.append(block)
        used += height
    chunks.append(current)
    return ['<div class="dpo-derivation">\n' + "\n".join(c) + "\n</div>" for c in chunks]


def fragments_html(steps: list[str]) -> str:
    """All the steps of a derivation, one fragment each (a deck splits them into slides)."""
    return "\n".join(derivation_chunks(steps))


# ---- Markdown: blocks, what stays on a slide and what goes to the notes ----------------------

LIST_ITEM = re.compile(r"^(?:[-*]|\d+\.)\s")


def md_blocks(text: str) -> list[str]:
    """The markdown's blocks: headings, paragraphs, lists, tables, display maths, code."""
    blocks, current, fenced, display = [], [], False, False

    def flush():
        if current:
            blocks.append("\n".join(current))
            current.clear()

    for line in text.splitlines():
        inside = fenced or display  # within a code fence or a $$ display: no block starts
        fenced ^= line.lstrip().startswith("```")
        display ^= line.count("$$") % 2 == 1
        if not inside and line.startswith("#"):
            flush()
            blocks.append(line)
        elif not inside and not line.strip():
            flush()
        elif not inside and LIST_ITEM.match(line) and current and not LIST_ITEM.match(current[0]):
            flush()  # a paragraph that introduces a list: two blocks
            current.append(line)
        else:
            current.append(line)
    flush()
    return blocks


def list_items(block: str) -> list[str]:
    items = []
    for line in block.splitlines():
        if LIST_ITEM.match(line) or not items:
            items.append(LIST_ITEM.sub("", line, count=1))
        else:
            items[-1] += " " + line.strip()
    return items


def _masked(text: str) -> str:
    """The text with maths and code spans blanked out, the same length: sentence ends inside
    them do not count."""
    return MATH_SPAN.sub(lambda m: "x" * len(m.group(0)),
                         re.sub(r"`[^`]*`", lambda m: "x" * len(m.group(0)), text))


def shortened(text: str, limit: int = SHORT) -> str | None:
    """What of a paragraph stays on a slide: all of it if short, else its first sentence, its
    bold lead-in or its first clauses, else nothing (it all goes to the notes)."""
    original, text = text, " ".join(text.split())
    if len(text) <= limit:
        return original  # its line breaks kept: a $$ display on its own line stays one
    end = re.search(r"[.!?:](?=\s+[A-Z*($`])", _masked(text))
    if end and end.end() <= limit:
        return text[:end.end()]
    lead = re.match(r"\*\*[^*]+\*\*", text)
    if lead and len(lead.group(0)) > 30:
        return lead.group(0)
    clause = [m.start() for m in re.finditer(r"[;,]\s", _masked(text)) if m.start() <= limit]
    return text[:clause[-1]] + " …" if clause and clause[-1] > limit // 3 else None


def _lines(text: str, per_line: int = CHARS_PER_LINE) -> int:
    visible = re.sub(r"\\[A-Za-z]+|[{}$*`]", "", text)
    return max(1, math.ceil(len(visible) / per_line))


def md(text: str) -> str:
    return markdown2html(text).strip()


def display_block(block: str) -> tuple[str, int, str]:
    """A $$ display; equations set side by side (\\qquad) are stacked, and one still wider
    than the slide goes to the notes."""
    text = block.strip()
    if not (text.endswith("$$") and text.count("$$") == 2):
        return md(block), 60 * (block.count("\n") + 1), ""
    tex = text[2:-2].strip()
    cuts = [0, *_top_level(tex, (r"\qquad",)), len(tex)]
    pieces = [tex[a:b].removeprefix(r"\qquad") for a, b in zip(cuts, cuts[1:])]
    shown, notes, height = [], [], 0
    for part in (p.strip().rstrip(",") for p in pieces if p.strip()):
        if tex_width(part) > DISPLAY_EMS:
            notes.append(f"$${part}$$")
            continue
        shown.append(f"$${part}$$")
        height += 50 + 45 * part.count(r"\\") + 40 * (r"\frac" in part)
    return (md("\n\n".join(shown)) if shown else "", height,
            md("\n\n".join(notes)) if notes else "")


def prose_block(block: str) -> tuple[str, int, str]:
    """(html on the slide, its height, html for the notes) for one markdown block."""
    first = block.lstrip()
    if first.startswith(("$$", "|", "<")) or first.startswith("```"):
        rows = max(block.count("\n") + 1, 1)
        if first.startswith("$$"):
            return display_block(block)
        if first.startswith("|") and rows <= 9 and len(block) <= TABLE_CHARS:
            return f'<div class="dpo-table">{md(block)}</div>', 44 * rows, ""
        return "", 0, md(block)
    if LIST_ITEM.match(first):
        items = list_items(block)
        kept = [shortened(item, SHORT - 40) or "" for item in items]
        full = any(k != i for k, i in zip(kept, items))
        marker = LIST_ITEM.match(first).group(0)
        body = md("\n".join(f"{marker}{k}" for k in kept if k))
        height = sum(_lines(k, CHARS_PER_LINE - 4) * PROSE_LINE + 8 for k in kept if k)
        return body, height, md(block) if full else ""
    kept = shortened(block)
    notes = md(block) if kept != block else ""
    return (md(kept), _lines(kept) * PROSE_LINE + 18, notes) if kept else ("", 0, notes)


# ---- The deck: slides packed under their headings --------------------------------------------

class Deck:
    """Slides in order; prose is packed onto the current slide until it is full."""

    def __init__(self):
        self.slides: list[dict] = []
        self.heading = ""

    def new(self, kind: str = "content", title: str | None = None) -> dict:
        slide = {"kind": kind, "title": title or self.heading, "parts": [], "notes": [],
                 "used": 0}
        self.slides.append(slide)
        return slide

    def current(self, height: int) -> dict:
        slide = self.slides[-1] if self.slides else None
        if (slide is None or slide["kind"] != "content" or slide["title"] != self.heading
                or (slide["used"] and slide["used"] + height > ROOM)):
            slide = self.new()
        return slide

    def add(self, body: str, height: int, notes: str = "") -> None:
        if not body:
            if notes:
                self.note(notes)
            return
        slide = self.current(height)
        slide["parts"].append(body)
        slide["used"] += height
        if notes:
            slide["notes"].append(notes)

    def orphan(self) -> list[str]:
        """A slide with only a one-line lead-in ("Now solve.") before a derivation is taken
        out; its line becomes a speaker note of the derivation."""
        slide = self.slides[-1] if self.slides else None
        if (slide and slide["kind"] == "content" and len(slide["parts"]) == 1
                and len(re.sub(r"<[^>]+>", "", slide["parts"][0])) <= ORPHAN):
            self.slides.pop()
            return slide["parts"] + slide["notes"]
        return []

    def note(self, notes: str) -> None:
        (self.slides[-1] if self.slides else self.new())["notes"].append(notes)

    def section(self, heading: str) -> None:
        self.heading = heading_html(heading)


def heading_html(text: str) -> str:
    # "1. Title" would be read as a numbered list
    return md_inline(re.sub(r"^(\d+)\. ", r"\1\\. ", text))


def md_inline(text: str) -> str:
    return re.sub(r"^<p>(.*)</p>$", r"\1", md(text), flags=re.DOTALL)


def is_check(source: str) -> bool:
    return any(line.lstrip().startswith("assert ") for line in source.splitlines())


def without_asserts(source: str) -> str:
    """The source with its assert statements taken out (they check, they do not teach)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    drop = {n for node in ast.walk(tree) if isinstance(node, ast.Assert)
            for n in range(node.lineno, node.end_lineno + 1)}
    lines = [ln for n, ln in enumerate(source.splitlines(), start=1) if n not in drop]
    return "\n".join(lines).strip()


def add_markdown(deck: Deck, source: str) -> None:
    for block in md_blocks(source):
        if block.startswith("#"):
            deck.section(block.lstrip("#").strip())
            deck.new()
        elif CHECK_PROSE.search(block):
            continue
        elif LIST_ITEM.match(block.lstrip()):
            markers = [m.group(0) for m in map(LIST_ITEM.match, block.splitlines()) if m]
            for marker, item in zip(markers, list_items(block)):  # a long list continues
                deck.add(*prose_block(f"{marker}{item}"))  # overleaf, item by item
        else:
            deck.add(*prose_block(block))


def add_output(deck: Deck, output, check: bool) -> None:
    """One output: a derivation or a figure gets slides of its own; a check's printout stays
    out; a formula, a table or a printout joins the current slide if it fits."""
    data = output.get("data", {})
    steps = derivation_steps(output)
    if steps:
        lead_in = deck.orphan()
        for chunk in derivation_chunks(steps):
            deck.new("derivation")["parts"].append(chunk)
        deck.slides[-1]["notes"] += lead_in
    elif any(k.startswith("image/png") for k in data):
        img = f'<img src="data:image/png;base64,{data["image/png"].strip()}" alt="">'
        deck.new("figure")["parts"].append(f'<figure class="dpo-figure">{img}</figure>')
    elif check:
        return
    elif "text/latex" in data:
        deck.add(f'<div class="dpo-maths">{html.escape(data["text/latex"])}</div>', 110)
    elif "text/html" in data or "text/markdown" in data:
        add_table(deck, data.get("text/html") or md(data["text/markdown"]))
    elif output.get("output_type") == "stream" and output.get("name") == "stdout":
        add_printout(deck, output.get("text", "").rstrip())


def add_table(deck: Deck, table: str) -> None:
    rows, chars = table.count("<tr"), len(re.sub(r"<[^>]+>", "", table))
    block = f'<div class="dpo-table">{table}</div>'
    if rows <= 8 and "<table" in table and chars <= TABLE_CHARS:
        deck.add(block, 36 * rows + 20)
    else:
        deck.note(block)


def add_printout(deck: Deck, text: str) -> None:
    lines = text.splitlines()
    pre = f'<pre class="dpo-output">{html.escape(text)}</pre>'
    if len(lines) <= 10 and max(map(len, lines), default=0) <= CODE_COLUMNS:
        deck.add(pre, CODE_LINE * len(lines) + 30)
    else:
        deck.note(pre)


def code_excerpt(code: str, pattern: str) -> str:
    """The code, or when it is too long for a slide, the lines from the one the plan names."""
    lines = code.splitlines()
    if len(lines) <= CODE_FIT:
        return code
    start = next((i for i, ln in enumerate(lines) if re.search(pattern, ln)), 0)
    return "\n".join(lines[start:start + CODE_FIT])


def add_code(deck: Deck, cell, patterns: list[str]) -> None:
    source = cell.source
    if TIMING.search(source):
        return
    named = next((p for p in patterns if re.search(p, source, re.MULTILINE)), None)
    if named:
        code = code_excerpt(without_asserts(source), named)
        longest = max(map(len, code.splitlines()), default=0)
        wide = " dpo-code-wide" if longest > CODE_COLUMNS else ""
        deck.new("code")["parts"].append(
            f'<pre class="dpo-code{wide}"><code>{html.escape(code)}</code></pre>')
    for output in cell.get("outputs", []):
        add_output(deck, output, is_check(source))


def title_cell(nb) -> tuple[str, str]:
    """The lecture's title (the first "# " heading without its number) and the rest of that
    cell, minus the paragraphs about running the notebook (hardware, run time, Colab)."""
    source = nb.cells[0].source if nb.cells else ""
    title, rest, skipping = "", [], False
    for line in source.splitlines():
        if line.startswith(("**", "#")):  # a new paragraph: is it about running the notebook?
            skipping = bool(RUN_INFO.search(line))
        if line.startswith("# ") and not title:
            title = re.sub(r"^\d+\s*[·.:-]\s*", "", line[2:].strip())
        elif not skipping and not RUN_INFO.search(line):
            rest.append(line)
    return title, "\n".join(rest)


def sections(nb) -> list[str]:
    return [line[3:].strip() for cell in nb.cells if cell.cell_type == "markdown"
            for line in cell.source.splitlines()
            if line.startswith("## ") and not line.startswith("## Summary")]


def opening(deck: Deck, nb, number: str, plan: dict) -> None:
    """Title, outline, motivating example and learning goals."""
    title, goals = title_cell(nb)
    cite = (f'{html.escape(PAPER["authors"])} (2023). <em>{html.escape(PAPER["title"])}'
            f'</em>. {PAPER["venue"]}, arXiv {PAPER["arxiv"]}.')
    slide = deck.new("title", md_inline(title))
    slide["parts"].append(f'<p class="dpo-lecture">Lecture {number.lstrip("0")} · dpo-course</p>'
                          f'<p class="dpo-paper">Based on: {cite}</p>')
    items = "".join(f"<li>{heading_html(s)}</li>" for s in sections(nb))
    deck.new("outline", "Outline")["parts"].append(f'<ul class="dpo-outline">{items}</ul>')
    if plan.get("motivation"):
        slide = deck.new("motivation", "A motivating example")
        slide["parts"] += [md(p) for p in plan["motivation"]]
    deck.section("Learning goals")
    add_markdown(deck, goals)


def closing(deck: Deck, plan: dict, summary_notes: str) -> None:
    """Recap of the key equations, summary, references."""
    if plan.get("recap"):
        rows = "".join(f'<div class="dpo-recap-row"><p>{md_inline(label)}</p>'
                       f'<div>\\[{html.escape(tex, quote=False)}\\]</div></div>'
                       for label, tex in plan["recap"])
        deck.new("recap", "Recap: the key equations")["parts"].append(rows)
    summary = deck.new("summary", "Summary")
    summary["parts"].append(md("\n".join(f"- {s}" for s in plan.get("summary", []))))
    if summary_notes:
        summary["notes"].append(summary_notes)
    keys = plan.get("references", ["dpo"])
    for start in range(0, len(keys), REFS_PER_SLIDE):
        refs = "".join(f"<li>{md_inline(REFERENCES[k])}</li>"
                       for k in keys[start:start + REFS_PER_SLIDE])
        deck.new("references", "References")["parts"].append(
            f'<ol class="dpo-refs" start="{start + 1}">{refs}</ol>')


def lecture(nb, number: str) -> list[dict]:
    """The notebook as a lecture: a list of slides {kind, title, parts, notes}."""
    nb = nbformat.from_dict(nb)
    OfflineContent().preprocess(nb, {})
    plan = LECTURES.get(number, {})
    deck = Deck()
    opening(deck, nb, number, plan)
    started, in_summary, summary_notes = False, False, []
    for cell in nb.cells[1:]:
        source = cell.source.lstrip()
        if cell.cell_type == "markdown" and source.startswith("## "):
            started, in_summary = True, source.startswith("## Summary")
        if not started or slide_type(cell) == "skip" or source.startswith("<details"):
            continue
        if in_summary:
            if cell.cell_type == "markdown":
                summary_notes.append(md(cell.source))
        elif slide_type(cell) == "notes":
            deck.note(md(cell.source))
        elif cell.cell_type == "markdown":
            add_markdown(deck, cell.source)
        elif cell.cell_type == "code":
            add_code(deck, cell, plan.get("code", []))
    slides = [s for s in deck.slides if s["parts"] or s["kind"] != "content"]
    deck.slides = _merge_empty(slides)
    closing(deck, plan, "\n".join(summary_notes))
    return deck.slides


def _merge_empty(slides: list[dict]) -> list[dict]:
    """A slide left with a heading and nothing else hands its notes to the next one."""
    kept, notes = [], []
    for slide in slides:
        if not slide["parts"] and slide["kind"] == "content":
            notes += slide["notes"]
            continue
        slide["notes"] = notes + slide["notes"]
        notes = []
        kept.append(slide)
    if notes and kept:
        kept[-1]["notes"] += notes
    return kept


def build_deck(path: Path, out: Path) -> Path:
    """Write out/NAME.slides.html, the lecture made from the notebook at `path`."""
    nb = nbformat.read(path, as_version=4)
    number = path.stem.split("_", 1)[0]
    slides = lecture(nb, number)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False)
    title = re.sub(r"<[^>]+>", "", slides[0]["title"])
    body = env.get_template("deck.html.j2").render(title=title, slides=slides)
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
        count = len(lecture(nbformat.read(path, as_version=4), path.stem.split("_", 1)[0]))
        print(f"{target}: {count} slides")
    return 0


if __name__ == "__main__":
    sys.exit(main())
