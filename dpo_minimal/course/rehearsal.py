"""Full mode, rehearsed on a CPU: caps on steps and sizes when DPO_COURSE_REHEARSAL=1.

`make rehearse` (scripts/rehearse.py) runs every notebook in full mode against tiny stand-in
models under the real Hub ids (scripts/fake_hub_cache.py), to prove that the full-mode code
runs end to end, not what it computes. There the notebooks cap their loops with `steps` and
their data with `rows`. Without the variable both return their argument unchanged, so a
student's full-mode run is exactly what the notebook says.
"""

import os

VARIABLE = "DPO_COURSE_REHEARSAL"
STEPS = 12  # optimiser steps per training run: enough for every eval_every and a moving loss
ROWS = 64  # preference pairs per data set


def active() -> bool:
    """True when DPO_COURSE_REHEARSAL=1; unset, empty or 0 means a real run."""
    value = os.environ.get(VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{VARIABLE}={value!r}: set it to 1 to cap full mode's steps and sizes "
                         "for a CPU rehearsal (make rehearse), or to 0 or unset it for a real run.")
    return value == "1"


def steps(n: int, cap: int = STEPS) -> int:
    """`n` optimiser steps, or min(n, cap) when rehearsing."""
    return min(n, cap) if active() else n


def rows(n: int, cap: int = ROWS) -> int:
    """`n` rows (pairs, prompts, examples), or min(n, cap) when rehearsing.

    E.g. `test_data = test_data.select(range(rehearsal.rows(len(test_data))))`.
    """
    return min(n, cap) if active() else n
