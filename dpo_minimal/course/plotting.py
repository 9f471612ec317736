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


PANEL = [
    ("loss", "DPO loss", "loss (nats)"),
    ("rewards/accuracies", "Reward accuracy", "fraction of pairs"),
    ("rewards/margins", "Reward margin", "beta * log-ratio margin (nats)"),
    (("rewards/chosen", "rewards/rejected"), "Implicit rewards", "beta * log-ratio (nats)"),
]


def plot_history(history, title: str = "DPO training", eval_keys: bool = True):
    """The standard 2x2 panel: loss, accuracy, margin, chosen/rejected rewards against steps.

    Training curves are solid; eval/* values, where recorded, are drawn as markers.
    Returns the figure.
    """
    import math

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (keys, name, unit) in zip(axes.flat, PANEL):
        for key in (keys,) if isinstance(keys, str) else keys:
            steps, values = history.series(key)
            ax.plot(steps, values, label=f"train {key.split('/')[-1]}")
            steps, values = history.series(f"eval/{key}")
            if eval_keys and steps:
                ax.plot(steps, values, "o--", label=f"held-out {key.split('/')[-1]}")
        if keys == "loss":
            ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2")
        ax.set(title=name, xlabel="optimiser step", ylabel=unit)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def markdown_table(rows: list[dict]) -> str:
    """A list of dicts as a Markdown table (display it with IPython.display.Markdown)."""
    keys = list(rows[0])
    clean = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(clean(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
