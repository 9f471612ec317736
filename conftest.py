"""pytest configuration shared by the unit tests and the nbval run of the notebooks."""

import os

os.environ.setdefault("DPO_COURSE_MODE", "smoke")


def pytest_collectstart(collector):
    # nbval: stderr carries warnings and progress bars whose text varies between machines;
    # images and widget state are compared by the asserts in the notebooks, not byte for byte.
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "stderr",
            "image/png",
            "image/svg+xml",
            "application/vnd.jupyter.widget-view+json",
        )
