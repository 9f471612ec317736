"""The notebooks' promises that no output comparison can check: sources cited, solutions
hidden but complete, one run time per notebook, one repository URL."""

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest
import tomllib
from notebook_tools import EXERCISE, cell_source, is_solution, solution_code

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_students_are_sent_only_to_sources_they_have(path):
    text = path.read_text(encoding="utf-8")
    found = re.findall(r"(?i)seed 00\d|seminar|earlier version of this notebook", text)
    assert not found, f"{path.name}: cite the paper or TRL's documentation instead of {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_exercise_has_a_hidden_solution_that_no_cell_runs(path):
    cells = _cells(path)
    exercises = [i for i, c in enumerate(cells)
                 if c["cell_type"] == "markdown" and EXERCISE.search(cell_source(c))]
    solutions = [i for i, c in enumerate(cells) if is_solution(c)]
    assert exercises, f"{path.name} has no exercises"
    for start, end in zip(exercises, exercises[1:] + [len(cells)]):
        assert any(start < i < end or i == start for i in solutions), \
            f"{path.name}: the exercise in cell {start} has no <details> solution after it"
    code_cells = [cell_source(c) for c in cells if c["cell_type"] == "code"]
    for i in solutions:
        lines = [line.strip() for line in solution_code(cells[i]).splitlines()]
        lines = [line for line in lines if len(line) > 20 and not line.startswith(
            ("#", "import", "from", "print(", "assert"))]
        for code in code_cells:
            copied = [line for line in lines if line in code]
            # A line or two in common is normal (the same call on other data); most of the
            # solution's statements in one cell is its executed copy, showing the answer.
            assert len(copied) < max(3, len(lines) / 2 + 1), \
                f"{path.name}: the solution in cell {i} also runs in a code cell: {copied[:3]}"


def _header_run_time(path: Path) -> str:
    match = re.search(r"\*\*Run time\.\*\* ([^\n]+)", cell_source(_cells(path)[0]))
    assert match, f"{path.name}: the title cell needs a '**Run time.** ...' line"
    return match.group(1).strip()


def test_run_times_have_one_source():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        row = next((line for line in readme.splitlines()
                    if line.startswith("|") and f"notebooks/{path.name})" in line), None)
        assert row, f"README's notebook table has no row for {path.name}"
        assert f"| {_header_run_time(path)} |" in row, \
            f"{path.name}: README and the title cell disagree on the run time"


def test_colab_setup_cells_install_from_the_one_repository_url():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = project["urls"]["Repository"]
    for path in NOTEBOOKS:
        cell = next(c for c in _cells(path)
                    if c["cell_type"] == "code" and "google.colab" in cell_source(c))
        setup = cell_source(cell)
        # nbval skips it by its tag (a "# NBVAL_SKIP" comment in notebooks not yet converted)
        assert "nbval-skip" in cell["metadata"].get("tags", []) or (
            path.stem[:2] in NOT_YET_CONVERTED and setup.startswith("# NBVAL_SKIP")), path.name
        install = next(line for line in setup.splitlines() if '"install"' in line)
        assert f'REPO = "{url}"' in setup and 'f"git+{REPO}"' in install, \
            f"{path.name}: the set-up cell must install from REPO = {url!r}, and only from there"
        assert not any(word in install for word in ("torch", '"-U"', "--upgrade")), \
            f"{path.name}: the set-up cell must leave Colab's torch alone"
        assert "raise RuntimeError" in setup, f"{path.name}: say what to do if the install fails"


# ---- what a student reads: about DPO, not about how the course is built and tested ----------

# Words about the course's own machinery. They belong in CONTRIBUTING.md. Word boundaries (and
# case where it matters: "CI", not "circuit") keep DPO prose such as "the test set" clear of them.
TOOLING_WORDS = re.compile("|".join([
    r"(?i:\bnbval\b)",
    r"\bCI\b",
    r"(?i:\brehears(?:al|als|e|ed|ing)\b)",
    r"(?i:\bcommitted outputs?\b)",
    r"(?i:\bcommit history\b)",
    r"(?i:\bnot yet (?:been )?measured\b)",
    r"(?i:\b(?:have|has) not been measured\b)",
    r"(?i:\bthe tests\b)",
    r"(?i:\bpytest\b)",
    r"(?i:\bmake (?:test|course|rehearse|lint)\b)",
    r"\btests?/[\w./-]+",
    r"\b\w*test\w*\.py\b",
]))
# A saved output that shows a warning or a path on the machine that ran the notebook.
OUTPUT_NOISE = re.compile(r"\w*Warning\b|warnings\.warn|/work/|/tmp/|/home/|/Users/|\.venv\b"
                          r"|site-packages|dist-packages")
# Notebooks not yet rewritten for students (issue 27, phase 2).
NOT_YET_CONVERTED: set[str] = set()
STUDENT_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem[:2] not in NOT_YET_CONVERTED]


def tooling_words(text: str) -> list[str]:
    return [m.group(0) for m in TOOLING_WORDS.finditer(text)]


def code_comments(source: str) -> str:
    """The comments of a code cell, one per line (the part a student reads as prose)."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        return "\n".join(t.string for t in tokens if t.type == tokenize.COMMENT)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return "\n".join(re.findall(r"#.*", source))


def output_text(output: dict) -> str:
    """The text of one saved output: streams, tracebacks and text-like display data."""
    parts = [output.get("text", "")] + output.get("traceback", [])
    for kind, value in output.get("data", {}).items():
        if kind.startswith("text/"):
            parts.append(value)
    return "\n".join("".join(p) if isinstance(p, list) else str(p) for p in parts)


@pytest.mark.parametrize("text, found", [
    ("nbval ignores this cell", ["nbval"]),
    ("CI's rehearsal runs it", ["CI", "rehearsal"]),
    ("from the committed outputs", ["committed outputs"]),
    ("on a T4: not yet measured", ["not yet measured"]),
    ("re-checked by `tests/test_symbolic.py`", ["tests/test_symbolic.py"]),
    ("the tests do not compare it", ["the tests"]),
    ("scored on the test set, a circuit of civic pairs", []),
    ("every number here is reported in the paper, not measured here", []),
])
def test_the_tooling_word_list_finds_tooling_and_spares_prose(text, found):
    assert tooling_words(text) == found


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_students_read_about_dpo_not_about_the_course_machinery(path):
    problems = []
    for i, cell in enumerate(_cells(path)):
        source = cell_source(cell)
        if cell["cell_type"] == "markdown":
            problems += [f"cell {i} (markdown): {w!r}" for w in tooling_words(source)]
        if cell["cell_type"] == "code":
            if "NBVAL" in source:
                problems.append(f"cell {i}: an NBVAL comment (scripts/nbval_tags.py: a tag)")
            problems += [f"cell {i} (comment): {w!r}" for w in tooling_words(code_comments(source))]
            for output in cell.get("outputs", []):
                problems += [f"cell {i} (output): {m.group(0)!r}"
                             for m in OUTPUT_NOISE.finditer(output_text(output))]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


SUMMARY = re.compile(r"^## Summary[ \t]*\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
NEXT = re.compile(r"^## Next[ \t]*\n(.*)", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_notebook_ends_with_a_summary_and_what_comes_next(path):
    cells = _cells(path)
    last_code = max(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    tail = "\n".join(cell_source(c) for c in cells[last_code + 1:]
                     if c["cell_type"] == "markdown" and not is_solution(c))
    summary, after = SUMMARY.search(tail), NEXT.search(tail)
    assert summary and after, f"{path.name}: end with a '## Summary' and then a '## Next' cell"
    assert summary.start() < after.start(), f"{path.name}: Summary first, then Next"
    bullets = re.findall(r"^- ", summary.group(1), re.MULTILINE)
    assert 3 <= len(bullets) <= 5, f"{path.name}: the Summary has {len(bullets)} bullets, not 3-5"
    assert cells[-1]["cell_type"] == "markdown" and NEXT.search(cell_source(cells[-1])), \
        f"{path.name}: the '## Next' cell is the last cell"
    later = [p for p in NOTEBOOKS if p.stem[:2] > path.stem[:2]]
    if later:
        number = later[0].stem[:2]
        assert re.search(rf"\b[Nn]otebook {number}\b|{later[0].name}", after.group(1)), \
            f"{path.name}: 'Next' should point to notebook {number}"
class _CpuBatches(ast.NodeVisitor):
    """Follows, in execution order, the names bound to `collate_pairs(...)` (CPU tensors) until
    they are rebound through `.to(...)`, and records every place one reaches a network: as the
    `input_ids=` of a call, or as an argument of a function the notebook defines."""

    def __init__(self):
        self.cpu, self.functions, self.found = set(), set(), []

    def _uses_cpu_batch(self, node) -> bool:
        return any(isinstance(n, ast.Name) and n.id in self.cpu for n in ast.walk(node))

    def visit_FunctionDef(self, node):
        self.functions.add(node.name)  # its body runs later, on the arguments it is given

    def visit_Assign(self, node):
        self.visit(node.value)
        moved = any(isinstance(n, ast.Attribute) and n.attr == "to" for n in ast.walk(node.value))
        made = (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "collate_pairs")
        for name in (t.id for t in node.targets if isinstance(t, ast.Name)):
            if made:
                self.cpu.add(name)
            elif moved:
                self.cpu.discard(name)

    def visit_Call(self, node):
        self.generic_visit(node)
        feeds = [k.value for k in node.keywords if k.arg == "input_ids"]
        if isinstance(node.func, ast.Name) and node.func.id in self.functions:
            feeds += node.args
        if any(self._uses_cpu_batch(value) for value in feeds):
            self.found.append(ast.unparse(node)[:80])


def _cpu_batches_fed_to_a_network(sources: list[str]) -> list[str]:
    checker = _CpuBatches()
    for source in sources:
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        checker.visit(ast.parse("\n".join(lines)))
    return checker.found


def test_the_device_check_finds_a_cpu_batch_fed_to_a_model():
    """The failure of issue 26 (notebook 04 on CUDA): a collated batch passed as it is."""
    fault = ['batch = collate_pairs(rows, 0)\nlogits = model(input_ids=batch["input_ids"])',
             "def logps_of(net, b):\n    return net(**b)\n",
             "for s in range(3):\n    b = collate_pairs(rows, 0)\n    ref = logps_of(policy, b)"]
    assert _cpu_batches_fed_to_a_network(fault) == [
        "model(input_ids=batch['input_ids'])", "logps_of(policy, b)"]
    fixed = ["batch = collate_pairs(rows, 0)\nbatch = {k: v.to(model.device) for k, v in "
             "batch.items()}\nlogits = model(input_ids=batch['input_ids'])"]
    assert _cpu_batches_fed_to_a_network(fixed) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_hand_written_tensor_code_moves_batches_to_the_model_s_device(path):
    """Full mode puts the model on a GPU, and `collate_pairs` builds CPU tensors: every cell
    (and exercise solution) that feeds a collated batch to a network moves it first."""
    sources = []
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            sources.append(cell_source(cell))
        elif is_solution(cell) and solution_code(cell):
            sources.append(solution_code(cell))
    found = _cpu_batches_fed_to_a_network(sources)
    assert not found, (f"{path.name}: a batch from collate_pairs reaches a network on the CPU: "
                       f"{found}; move it first: {{k: v.to(model.device) for k, v in "
                       f"batch.items()}}")
