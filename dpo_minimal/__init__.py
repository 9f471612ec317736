"""dpo_minimal: a small, tested library for Direct Preference Optimization (Rafailov et al. 2023).

Importing it changes no process state. The course's labs live in `dpo_minimal.course`.
"""

from .data import (
    collate_pairs,
    collate_unpaired,
    load_preferences,
    shipped_data_path,
    tokenize_preferences,
)
from .logprobs import sequence_logps
from .losses import dpo_loss
from .models import add_lora, load_model, tiny_model
from .train import History, TrainConfig, evaluate, train

__version__ = "0.1.0"
__all__ = [
    "History",
    "TrainConfig",
    "add_lora",
    "collate_pairs",
    "collate_unpaired",
    "dpo_loss",
    "load_model",
    "load_preferences",
    "sequence_logps",
    "shipped_data_path",
    "tiny_model",
    "tokenize_preferences",
    "evaluate",
    "train",
]
