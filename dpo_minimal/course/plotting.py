"""Figures: where they are saved, and the standard training panel."""

import os
from pathlib import Path


def figures_dir() -> Path:
    """figures/ at the repository root when run from notebooks/, else ./figures.

    DPO_COURSE_FIGURES overrides both.
    """
    if os.environ.get("DPO_COURSE_FIGURES"):
        path = Path(os.environ["DPO_COURSE_FIGURES"])
    elif Path.cwd().name == "notebooks" and (Path.cwd().parent / "pyproject.toml").exists():
        path = Path.cwd().parent / "figures"
    else:
        path = Path.cwd() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Save `fig` as figures/<name>.png (150 dpi, tight) and return the path."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_history(history, title: str = "DPO training", eval_keys: bool = True):
    """The standard 2x2 panel (`History.plot`): loss, accuracy, margin, chosen/rejected rewards
    against steps, in a pyplot figure so that a notebook shows it. Training curves are solid;
    eval/* values, where recorded (and `eval_keys`), are drawn as markers."""
    import matplotlib.pyplot as plt

    from ..config import History

    if not eval_keys:
        history = [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in history]
    return History(history).plot(figure=plt.figure(figsize=(10, 6.5)), title=title)


def markdown_table(rows: list[dict]) -> str:
    """A list of dicts as a Markdown table (display it with IPython.display.Markdown)."""
    keys = list(rows[0])
    clean = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(clean(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
