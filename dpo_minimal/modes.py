"""One switch for the whole course: DPO_COURSE_MODE = smoke | full.

smoke: tiny models of the real architectures and the shipped data, on CPU, in seconds, offline.
full:  gpt2 / microsoft/phi-2 and the Hub data set, for a student with a GPU and internet.
Unset: full when CUDA is available, smoke otherwise.
"""

import os

MODES = ("smoke", "full")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def get_mode() -> str:
    """The course mode from DPO_COURSE_MODE, or from CUDA's presence when it is unset."""
    value = os.environ.get("DPO_COURSE_MODE", "").strip().lower()
    if value in MODES:
        return value
    if value:
        raise ValueError(
            f"DPO_COURSE_MODE={value!r} is not a mode: set it to 'smoke' or 'full', or unset it "
            "(then full when CUDA is available, smoke otherwise)."
        )
    import torch

    return "full" if torch.cuda.is_available() else "smoke"


def setup_mode() -> str:
    """Resolve the mode and, in smoke mode, forbid the Hugging Face libraries the network."""
    mode = get_mode()
    if mode == "smoke":
        for var in _OFFLINE_VARS:
            os.environ[var] = "1"
        # huggingface_hub reads the variable at import, so patch it too if already imported.
        import sys

        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
    return mode
