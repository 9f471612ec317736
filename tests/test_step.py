"""The public DPO step: batch_logps, Reference, preference_step, and every loss through train."""

import math

import pytest
import torch

from dpo_minimal import collate_pairs, load_preferences, shipped_data_path, tiny_model
from dpo_minimal.data import tokenize_preferences
from dpo_minimal.logprobs import PairLogps, batch_logps, sequence_logps
from dpo_minimal.losses import LOSSES, dpo_loss
from dpo_minimal.train import Reference, TrainConfig, preference_step, train

DATA = load_preferences(shipped_data_path("train")).select(range(16))


def _batch(tok, n=4):
    pairs = tokenize_preferences(DATA.select(range(n)), tok, 64, 32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    batch["index"] = torch.arange(n)
    return batch


def test_batch_logps_equals_sequence_logps_on_full_logits(tiny_lora):
    model, tok = tiny_lora()
    batch = _batch(tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        got, entropy = batch_logps(model, batch, with_entropy=True)
    assert isinstance(got, PairLogps) and got.chosen.shape == got.rejected.shape == (4,)
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-4)  # chosen rows first
    assert entropy > 0


def test_preference_step_is_dpo_loss_on_the_halves(tiny_lora):
    model, tok = tiny_lora()
    batch = _batch(tok)
    moved = torch.cat(batch_logps(model, batch)) + torch.linspace(-1, 1, 8)  # as if trained
    policy = PairLogps.from_rows(moved)
    reference = Reference().logps(model, batch)
    config = TrainConfig(beta=0.3)
    losses, sums = preference_step(policy, reference, batch, config)
    expected, chosen, rejected = dpo_loss(policy.chosen, policy.rejected, reference.chosen,
                                          reference.rejected, beta=0.3)
    torch.testing.assert_close(losses, expected)
    assert sums["rewards/accuracies"] == float((chosen > rejected).sum())
    assert math.isclose(sums["rewards/margins"], float((chosen - rejected).sum()), rel_tol=1e-6)


def test_reference_cache_is_filled_once_and_then_answers(tiny_lora):
    model, tok = tiny_lora()
    batch = _batch(tok)
    reference = Reference(cache=torch.full((4, 2), float("nan")))
    first = reference.logps(model, batch)
    assert not reference.cache.isnan().any()
    with torch.no_grad():  # change the model: a cache that answers ignores it
        for p in model.parameters():
            p.add_(0.01)
    torch.testing.assert_close(reference.logps(model, batch), first)
    separate = Reference(model=tiny_model("gpt2", seed=1)[0])
    assert not torch.allclose(torch.cat(separate.logps(model, batch)), torch.cat(first))


def test_reference_needs_an_adapter_a_model_or_a_cache():
    model, tok = tiny_model("gpt2")
    with pytest.raises(ValueError, match="no reference"):
        Reference().logps(model, _batch(tok))


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_registered_loss_trains(loss_type, tiny_lora):
    model, tok = tiny_lora()
    config = TrainConfig(loss_type=loss_type, batch_size=4, max_steps=4, max_length=64,
                         max_prompt_length=32, learning_rate=1e-2, progress=False)
    history = train(model, tok, DATA, config)
    assert all(math.isfinite(row["loss"]) for row in history)
    first = {"sigmoid": math.log(2), "robust": math.log(2), "kto": 0.5, "hinge": 1.0,
             "ipo": (1 / (2 * 0.1)) ** 2}
    if loss_type in first:  # at step 0 the policy is the reference
        assert abs(history[0]["loss"] - first[loss_type]) < 1e-5
    assert history[-1]["loss"] < history[0]["loss"]


def test_an_unknown_loss_is_refused_by_the_config():
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid.*kto.*orpo"):
        TrainConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        TrainConfig(loss_type="kto", label_smoothing=0.1)


def test_warmup_follows_transformers_schedule(tiny_lora):
    model, tok = tiny_lora()
    config = TrainConfig(batch_size=4, max_steps=4, warmup_steps=2, learning_rate=1e-2,
                         max_length=64, max_prompt_length=32, progress=False,
                         lr_scheduler="constant")
    history = train(model, tok, DATA, config)
    assert [row["learning_rate"] for row in history] == pytest.approx([0, 5e-3, 1e-2, 1e-2])
