"""What several test files share and pytest cannot hand out as a fixture: functions and data used
while tests are collected (in `parametrize` lists), and pure functions of their arguments.

The fixtures (a tiny LoRA model, a fault injected into a training run) are in conftest.py.
"""

from contextlib import contextmanager

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

# The History keys that measure this machine, not the training: they differ between two runs.
TIMING = {"step_seconds", "tokens_per_second", "peak_memory_gib"}


def without_timing(history) -> list[dict]:
    """History rows without their `TIMING` keys: what two equal runs must share bit for bit."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def all_of(*patterns: str) -> str:
    """A regex that matches a message containing every pattern, in any order.

    A pattern may start with "(?i)": that one alone is matched ignoring case.
    """
    scoped = [f"(?i:{p[4:]})" if p.startswith("(?i)") else f"(?:{p})" for p in patterns]
    return "(?s)^" + "".join(f"(?=.*{p})" for p in scoped)


@contextmanager
def refused_before_training(model, exc, pattern: str):
    """pytest.raises, plus: no weight of `model` changed before the error was raised."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(exc, match=pattern):
        yield
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert not changed, f"trained before refusing: {changed[:3]}"


# --- the site: a synthetic course notebook (test_site.py builds it, test_browser.py opens it) --

STEPS = [
    r"p^*(y_1 \succ y_2 \mid x) &= \frac{e^{r_1}}{e^{r_1} + e^{r_2}} "
    r"&& \text{Bradley-Terry} \tag{1}",
    r"&= \frac{1}{1 + e^{r_2 - r_1}} && \text{divide by } e^{r_1}",
    r"&= \sigma(r_1 - r_2) && \text{definition of } \sigma",
]


def synthetic_notebook() -> nbformat.NotebookNode:
    """A small course notebook: title, set-up, a derivation (the helper's contract), an exercise.

    Its derivation output is what the derivation helper writes: text/latex with the aligned
    steps, and the steps again in the output metadata.
    """
    latex = r"\begin{align*}" + r" \\ ".join(STEPS) + r"\end{align*}"
    derivation = new_output("display_data", data={"text/latex": latex, "text/plain": "<steps>"},
                            metadata={"dpo_course": {"derivation_steps": STEPS}})
    badge = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             "(https://colab.research.google.com/github/o/r/blob/main/notebooks/99.ipynb)")
    nb = new_notebook(cells=[
        new_markdown_cell(f"# 99 · A synthetic notebook\n\nGoal: $\\sigma(r_1 - r_2)$.\n\n{badge}"),
        new_code_cell("# NBVAL_SKIP\nIN_COLAB = False"),
        new_markdown_cell("## 1. Bradley-Terry\n\nInline $\\beta$, display $$\\frac{a}{b}.$$"),
        new_code_cell("bt = derivation(...)", outputs=[derivation]),
        new_markdown_cell("### Numbers\n\nThe same in numbers."),
        new_code_cell("print('p =', 0.73)", outputs=[
            new_output("stream", name="stdout", text="p = 0.73\n"),
            new_output("stream", name="stderr", text="a warning\n")]),
        new_markdown_cell("<details><summary>Solution</summary>\n\n```python\nx = 1\n```\n"
                          "</details>"),
        new_code_cell("\n".join(f"x{i} = {i}" for i in range(20))),
        new_markdown_cell("The end: $\\pi^*(y \\mid x)$."),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb
