"""The course's teaching labs: modes, the bandit lab, SymPy derivations, plots, the task world.

Nothing here is needed to use `dpo_minimal` as a library. Each notebook starts with
`course = setup()`, the one place where the course changes process state.
"""

from dataclasses import dataclass

from . import rehearsal
from .modes import get_mode, go_offline, quiet_known_warnings
from .smollm2 import load_smollm2  # noqa: F401 - a real instruct model (notebook 08)


@dataclass(frozen=True)
class Course:
    """What a notebook needs to know about where it runs."""

    mode: str  # "smoke" or "full"
    device: str  # "cuda" in full mode with a GPU, else "cpu"

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"


def setup(threads: int | None = None, verbose: bool = True) -> Course:
    """Set up a notebook: resolve the mode, and in smoke mode stay off the network.

    Smoke mode sets HF_HUB_OFFLINE (and the datasets/transformers switches), so nothing can
    reach the Hub, hides transformers' progress bars (loading a tiny model is instant), and runs
    torch on one thread: the tiny models gain nothing from more, and on
    shared cores (CI, a busy laptop) threads that wait for each other cost far more than they
    give. `threads` overrides the thread count in either mode, except in a rehearsal
    (`rehearsal.active()`: capped steps, run beside other jobs), which keeps one thread.
    Prints the mode and device.
    In either mode it silences the libraries' known warnings about their own internals
    (`modes.KNOWN_WARNINGS`, each by message and category), so outputs show only what matters.
    """
    import torch

    quiet_known_warnings()
    mode = get_mode()
    if mode == "smoke":
        go_offline()
        # Loading a shipped tiny model takes milliseconds: a progress bar for it is only noise.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if threads is not None or mode == "smoke":
        torch.set_num_threads(1 if rehearsal.active() else threads or 1)
    device = "cuda" if mode == "full" and torch.cuda.is_available() else "cpu"
    if verbose:
        print(f"mode: {mode} (device: {device})")
    return Course(mode, device)
