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


@pytest.fixture
def interrupt_update(monkeypatch):
    """interrupt_update(n): the n-th optimiser update of the test raises KeyboardInterrupt
    before it changes anything, as Ctrl-C pressed then would (`monkeypatch.undo()` ends it)."""
    from dpo_minimal.train import _Run

    def arm(call: int) -> None:
        update, calls = _Run.update, []

        def interrupted(self):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return update(self)

        monkeypatch.setattr(_Run, "update", interrupted)

    return arm
