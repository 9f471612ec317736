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
