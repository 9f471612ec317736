"""Reading the course notebooks: exercise solutions kept in collapsed, unexecuted cells.

A solution is a markdown cell that starts with `<details><summary>Solution` and holds its code in
```python fenced blocks. The notebook never runs it, so its committed outputs do not give the
answer away; the nbval run (conftest.py) and tests/test_notebooks.py run every one.
"""

import re

SOLUTION = re.compile(r"^\s*<details>\s*<summary>\s*Solution", re.IGNORECASE)
EXERCISE = re.compile(r"\*\*Exercise (\d+)\b")
CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)


def cell_source(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def is_solution(cell) -> bool:
    return cell["cell_type"] == "markdown" and bool(SOLUTION.match(cell_source(cell)))


def solution_code(cell) -> str:
    """The Python code of a solution cell: its fenced blocks, joined in order."""
    return "\n".join(CODE_BLOCK.findall(cell_source(cell)))


def isolated(code: str) -> str:
    """Source that runs `code` in a copy of the notebook's globals.

    A solution may rebind names (A, B, model...) that later cells use; running it in a copy keeps
    the notebook's own state, and so its compared outputs, as they would be without it.
    """
    return f"exec(compile({code!r}, '<solution>', 'exec'), dict(globals()))"
