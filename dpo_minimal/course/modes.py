"""One switch for the whole course: DPO_COURSE_MODE = smoke | full.

smoke: tiny models of the real architectures and the shipped data, on CPU, in seconds, offline.
full:  gpt2 / microsoft/phi-2 and the Hub data set, for a student with a GPU and internet.
Unset: full when CUDA is available, smoke otherwise.

Nothing here runs on import: a notebook calls `dpo_minimal.course.setup()`.
"""

import os
import sys
import warnings

MODES = ("smoke", "full")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


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


def go_offline() -> None:
    """Forbid the Hugging Face libraries the network, for this process and its children.

    huggingface_hub reads HF_HUB_OFFLINE when it is imported, so an already imported copy is
    switched too.
    """
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


# Warnings the libraries under the course raise about their own internals, each matched by its
# message and category: (message regex, category). Nothing a student can act on, and they would
# print the installation's paths into every saved output. Any other warning still shows.
KNOWN_WARNINGS = (
    # peft asks transformers for a renamed attribute whenever it wraps or reloads a model
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # transformers 5 still takes TrainingArguments' `gradient_checkpointing`, the name TRL's
    # SFTConfig and DPOConfig document, and says it becomes `activation_checkpointing` in v6
    (r"`gradient_checkpointing` is deprecated", FutureWarning),
)


def quiet_known_warnings() -> None:
    """Silence KNOWN_WARNINGS, one narrow filter each (message and category); idempotent."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
