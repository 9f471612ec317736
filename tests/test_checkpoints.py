"""Nothing lost: checkpoints, resume bit for bit, and an interrupted run that keeps its steps."""

import math
import sys
from dataclasses import replace
from functools import cache

import pytest
import torch
from helpers import without_timing

from dpo_minimal import load_preferences, shipped_data_path, tiny_model
from dpo_minimal.adapters import load_adapter
from dpo_minimal.train import (
    NonFiniteLossError,
    TrainConfig,
    train,
)

DATA = load_preferences(shipped_data_path("train")).select(range(12))
HELD_OUT = load_preferences(shipped_data_path("test")).select(range(4))
CONFIG = TrainConfig(batch_size=2, gradient_accumulation_steps=2, max_steps=6, max_length=64,
                     max_prompt_length=32, learning_rate=1e-2, warmup_steps=1, eval_every=2,
                     progress=False)


def _saving(folder, **kwargs) -> TrainConfig:
    """CONFIG, with a checkpoint in `folder` every 2 steps."""
    return replace(CONFIG, **{"output_dir": str(folder), "save_steps": 2, **kwargs})


@pytest.fixture(scope="module")
def models(tiny_lora):
    """models(lora) -> (model, tokenizer): the same tiny GPT-2 under LoRA, or alone."""
    return lambda lora: tiny_lora() if lora else tiny_model("gpt2", seed=0)


@pytest.fixture(scope="module")
def uninterrupted(models):
    """uninterrupted(lora) -> History of the run the interrupted ones are compared with."""
    @cache
    def run(lora: bool):
        config = replace(CONFIG, **({} if lora else {"learning_rate": 1e-4}))
        return train(*models(lora), DATA, config, eval_data=HELD_OUT)

    return run


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("stop", [2, 5])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, lora,
                                                                  stop, interrupt_update,
                                                                  models, uninterrupted):
    lr = {} if lora else {"learning_rate": 1e-4}
    whole = uninterrupted(lora)

    model, tok = models(lora)
    interrupt_update(stop)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(model, tok, DATA, _saving(tmp_path / "cut", **lr), eval_data=HELD_OUT)
    monkeypatch.undo()
    assert len(caught.value.history) == stop - 1  # every completed step is kept...
    assert caught.value.checkpoint.name == f"checkpoint-{stop - 1}"  # ...and on disk

    model, tok = models(lora)
    resumed = train(model, tok, DATA, _saving(tmp_path / "cut", **lr), eval_data=HELD_OUT,
                    resume_from=True)
    assert without_timing(resumed) == without_timing(whole)  # bit for bit, not approximately
    assert math.isfinite(resumed[-1]["loss"])


def test_save_steps_and_the_newest_k_checkpoints(tmp_path, models):
    model, tok = models(True)
    train(model, tok, DATA, _saving(tmp_path, max_steps=5, save_total_limit=2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-4", "checkpoint-5"]  # every 2 steps and at the end, newest 2
    files = {p.name for p in (tmp_path / "checkpoint-5").iterdir()}
    assert {"trainable.safetensors", "state.pt", "config.json", "history.json",
            "adapter"} <= files
    reloaded = load_adapter(tiny_model("gpt2", seed=0)[0], tmp_path / "checkpoint-5" / "adapter")
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(dict(reloaded.named_parameters())[name], p, rtol=0, atol=0)


def test_a_non_finite_loss_keeps_the_completed_steps(tmp_path, monkeypatch, models):
    train_module = sys.modules["dpo_minimal.train"]  # the package exports the function `train`
    step, calls = train_module.preference_step, []

    def poisoned(policy, reference, batch, config):
        calls.append(1)
        losses, sums = step(policy, reference, batch, config)
        return (losses * math.nan if len(calls) == 7 else losses), sums

    monkeypatch.setattr(train_module, "preference_step", poisoned)
    model, tok = models(True)
    with pytest.raises(NonFiniteLossError, match="step 3") as caught:
        train(model, tok, DATA, _saving(tmp_path))
    assert len(caught.value.history) == 3
    assert caught.value.checkpoint.name == "checkpoint-3"


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path, models):
    model, tok = models(True)
    train(model, tok, DATA, _saving(tmp_path, max_steps=2))
    model, tok = models(True)
    with pytest.raises(ValueError, match="other settings.*beta"):
        train(model, tok, DATA, _saving(tmp_path, max_steps=2, beta=0.5), resume_from=True)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        train(model, tok, DATA, _saving(tmp_path), resume_from=tmp_path / "checkpoint-9")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(model, tok, DATA, _saving(tmp_path / "empty"), resume_from=True)


def test_the_weights_checksum_reaches_the_end_of_a_real_model_s_embedding():
    # SmolLM2's embedding has 49152 x 576 > 2**24 values: float32 spacing rounds the last
    # index past the end, which must not stop a run before it starts.
    from dpo_minimal.checkpoint import weights_digest

    big = torch.zeros(2**24 + 3)
    big[-1] = 1.0
    other = big.clone()
    other[-1] = 2.0
    assert weights_digest([("w", big)]) != weights_digest([("w", other)])
