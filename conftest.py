"""pytest configuration shared by the unit tests and the nbval run of the notebooks."""

import os
import sys
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest

os.environ.setdefault("DPO_COURSE_MODE", "smoke")
sys.path.insert(0, str(Path(__file__).parent / "tests"))

from notebook_tools import is_solution, isolated, solution_code  # noqa: E402


def pytest_collectstart(collector):
    if not (collector.fspath and collector.fspath.ext == ".ipynb"):
        return
    # stderr carries warnings and progress bars whose text varies between machines; images and
    # widget state are compared by the asserts in the notebooks, not byte for byte.
    collector.skip_compare += (
        "stderr",
        "image/png",
        "image/svg+xml",
        "application/vnd.jupyter.widget-view+json",
    )
    collect = collector.collect
    if os.environ.get("DPO_COURSE_SOLUTIONS", "1") == "0":  # make nbval-portable: run once only
        return

    def collect_with_solutions():
        """The notebook's cells, plus each exercise solution run where its cell stands."""
        cells = list(collect())
        from nbval.plugin import IPyNbCell

        out, position, count = [], 0, 0
        for cell in collector.nb.cells:
            if cell.cell_type == "code":
                out.append(cells[position])
                position += 1
            elif is_solution(cell) and solution_code(cell):
                count += 1
                code = nbformat.v4.new_code_cell(isolated(solution_code(cell)))
                options = defaultdict(bool, check=False)  # its outputs are nowhere committed
                out.append(IPyNbCell.from_parent(collector, name=f"Solution {count}",
                                                 cell_num=position, cell=code, options=options))
        return out

    collector.collect = collect_with_solutions


@pytest.fixture(scope="session")
def tiny_lora():
    """tiny_lora(arch="gpt2", seed=0, pretrained=False, r=4, alpha=8) -> (model, tokenizer).

    A tiny model of a real architecture (`dpo_minimal.tiny_model`) under a fresh LoRA adapter,
    in eval mode, with the course tokenizer: a new one each call, the same weights for the same
    arguments (LoRA's A is drawn after the seeded initialisation; a pretrained model's here).
    """
    import torch

    from dpo_minimal import add_lora, tiny_model

    def make(arch: str = "gpt2", seed: int = 0, pretrained: bool = False, r: int = 4,
             alpha: int = 8):
        model, tokenizer = tiny_model(arch, seed=seed, pretrained=pretrained)
        if pretrained:
            torch.manual_seed(seed)
        return add_lora(model, r=r, alpha=alpha).eval(), tokenizer

    return make


@pytest.fixture
def at_call(monkeypatch):
    """at_call(method, n, action, after=False): a fault injected into the next training runs.

    The n-th call of a run's `method` ("micro_step", "update", "evaluate" or "save"; counted
    over every run of the test) calls `action(run)` before the method does anything, or with
    `after=True` once it has returned: Ctrl-C pressed, a signal sent or weights poisoned at
    that point. `monkeypatch.undo()` ends it. A training run has no public hook at such points:
    fault injection reaches into the trainer's `_Run` here (and in test_ddp.py's launched
    script, which no fixture reaches), and nowhere else in the tests.
    """
    from dpo_minimal.train import _Run

    def arm(method: str, n: int, action, after: bool = False) -> None:
        real, calls = getattr(_Run, method), []

        def wrapped(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n and not after:
                action(self)
            out = real(self, *args, **kwargs)
            if len(calls) == n and after:
                action(self)
            return out

        monkeypatch.setattr(_Run, method, wrapped)

    return arm


def _ctrl_c(run) -> None:
    raise KeyboardInterrupt


@pytest.fixture
def interrupt_update(at_call):
    """interrupt_update(n): the n-th optimiser update of the test raises KeyboardInterrupt
    before it changes anything, as Ctrl-C pressed then would (`monkeypatch.undo()` ends it)."""
    return lambda n: at_call("update", n, _ctrl_c)
