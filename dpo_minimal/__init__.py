"""dpo_minimal: a small, tested library for Direct Preference Optimization (Rafailov et al. 2023).

Backs the dpo-course notebooks. See README.md for the course and the API.
"""

from .modes import get_mode, setup_mode

# Resolve the mode before transformers and datasets are imported, so that smoke mode's offline
# switches are in place when huggingface_hub reads them.
MODE = setup_mode()

from .data import (  # noqa: E402
    collate_pairs,
    load_preferences,
    shipped_data_path,
    tokenize_preferences,
)
from .logprobs import sequence_logps  # noqa: E402
from .losses import dpo_loss  # noqa: E402
from .models import add_lora, load_model, tiny_model  # noqa: E402
from .train import History, TrainConfig, evaluate, train  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "MODE",
    "History",
    "TrainConfig",
    "add_lora",
    "collate_pairs",
    "dpo_loss",
    "get_mode",
    "load_model",
    "load_preferences",
    "sequence_logps",
    "setup_mode",
    "shipped_data_path",
    "tiny_model",
    "tokenize_preferences",
    "evaluate",
    "train",
]
