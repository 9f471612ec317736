"""The trainer: ln 2 start, only LoRA changes, determinism, guards, adapter round trip."""

import math
from dataclasses import replace

import pytest
import torch
from helpers import TIMING

from dpo_minimal import load_preferences, shipped_data_path, tiny_model
from dpo_minimal.adapters import generate_pairs, load_adapter, save_adapter
from dpo_minimal.train import (
    History,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    train,
)

DATA = load_preferences(shipped_data_path("train")).select(range(32))
HELD_OUT = load_preferences(shipped_data_path("test")).select(range(8))
KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "step_seconds",
        "tokens_per_second", "peak_memory_gib"}


CONFIG = TrainConfig(batch_size=4, max_steps=3, max_length=64, max_prompt_length=32,
                     learning_rate=1e-2, progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_first_step_is_ln2_with_zero_margins(arch, tiny_lora):
    model, tok = tiny_lora(arch)  # LoRA's dropout 0.05 and GPT-2's 0.1: train must disable them
    history = train(model, tok, DATA, replace(CONFIG, max_steps=2))
    assert KEYS <= set(history[0])
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6
    assert history[0]["rewards/margins"] == 0 and history[0]["rewards/accuracies"] == 0
    assert history[1]["rewards/margins"] != 0  # and it does learn after the first update


def test_evaluate_before_training_is_ln2(tiny_lora):
    model, tok = tiny_lora()
    metrics = evaluate(model, tok, HELD_OUT, CONFIG)
    assert abs(metrics["loss"] - math.log(2)) < 1e-6 and metrics["rewards/margins"] == 0
    assert metrics["entropy"] > 0


def test_only_lora_weights_change(tiny_lora):
    model, tok = tiny_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tok, DATA, CONFIG)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_same_seed_same_losses_and_different_seed_differs(tiny_lora):
    runs = []
    for seed in (0, 0, 1):
        model, tok = tiny_lora()
        runs.append([row["loss"] for row in train(model, tok, DATA, replace(CONFIG, seed=seed))])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_gradient_accumulation_and_checkpointing_run(tiny_lora):
    model, tok = tiny_lora()
    history = train(model, tok, DATA, replace(CONFIG, gradient_accumulation_steps=2,
                                              gradient_checkpointing=True, max_steps=2))
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)


def _count_reference_passes(model) -> list:
    """Wrap model.disable_adapter (the reference forward) to count its uses."""
    calls, original = [], model.disable_adapter

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.disable_adapter = counted
    return calls


def test_reference_cache_skips_the_reference_pass_from_the_second_epoch(tiny_lora):
    data = DATA.select(range(8))  # 2 batches of 4 pairs: 6 steps are 3 epochs
    runs = {}
    for cache in (True, False):
        model, tok = tiny_lora()
        calls = _count_reference_passes(model)
        history = train(model, tok, data, replace(CONFIG, max_steps=6, cache_reference=cache))
        runs[cache] = ([row["loss"] for row in history], len(calls))
    assert runs[True][1] == 2 and runs[False][1] == 6  # epoch 1 only vs every step
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-5)
    assert runs[True][0][-1] < runs[True][0][0]


def test_fused_gelu_follows_the_same_trajectory_and_is_undone(tiny_lora):
    from transformers.activations import NewGELUActivation

    losses = {}
    for fused in (True, False):
        model, tok = tiny_lora()
        history = train(model, tok, DATA, replace(CONFIG, fused_gelu=fused))
        losses[fused] = [row["loss"] for row in history]
        assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == 4
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(tiny_lora):
    model, tok = tiny_lora()
    with torch.no_grad():  # poison a trainable weight so the policy's logits become NaN
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 0 in a float32 run.*learning_rate") as e:
        train(model, tok, DATA, CONFIG)
    assert "float16" not in str(e.value)  # a float32 run cannot overflow float16


def test_float16_on_cpu_is_refused(tiny_lora):
    model, tok = tiny_lora()
    with pytest.raises(ValueError, match="float16.*CUDA"):
        train(model, tok, DATA, replace(CONFIG, dtype="float16"))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="unknown loss_type"):
        TrainConfig(loss_type="dpo++")
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float8")
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(beta=0)


def test_no_trainable_parameters_raises():
    model, tok = tiny_model("gpt2")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tok, DATA, CONFIG)


def test_full_fine_tuning_uses_a_frozen_reference():
    model, tok = tiny_model("gpt2")
    history = train(model, tok, DATA, replace(CONFIG, learning_rate=1e-3), eval_data=HELD_OUT)
    assert abs(history[0]["loss"] - math.log(2)) < 1e-5
    assert "eval/loss" in history[-1] and history[-1]["eval/rewards/margins"] != 0


def test_dropout_trains_full_fine_tuning_with_noise_and_keeps_the_reference_clean(tiny_lora):
    model, tok = tiny_model("gpt2")
    history = train(model, tok, DATA, replace(CONFIG, learning_rate=1e-3, dropout=0.1))
    # The reference is frozen in eval mode, so at step 0 only the policy's dropout moves the
    # log-ratios away from 0: the first loss is no longer exactly ln 2.
    assert history[0]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    with pytest.raises(ValueError, match="full fine-tuning"):
        train(tiny_lora()[0], tok, DATA, replace(CONFIG, dropout=0.1))
    with pytest.raises(ValueError, match="dropout must be in"):
        replace(CONFIG, dropout=1.0)


def test_eval_every_and_history_json_round_trip(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    history = train(model, tok, DATA, replace(CONFIG, max_steps=4, eval_every=2),
                    eval_data=HELD_OUT)
    # After steps 2 and 4, as the console numbers them.
    assert [r["step"] for r in history if "eval/loss" in r] == [2, 4]
    again = History.from_json(history.to_json(tmp_path / "history.json"))
    assert again == history and again.series("loss")[0] == [1, 2, 3, 4]


def test_adapter_round_trip_and_generation_table(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    train(model, tok, DATA, CONFIG)
    trained = evaluate(model, tok, HELD_OUT, CONFIG)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = load_adapter(tiny_model("gpt2")[0], tmp_path / "adapter")
    again = evaluate(reloaded, tok, HELD_OUT, CONFIG)
    assert again["logps/chosen"] == trained["logps/chosen"]
    assert again["rewards/margins"] == trained["rewards/margins"]
    rows = generate_pairs(model, tok, ["Can you see me?"], max_new_tokens=5)
    assert set(rows[0]) == {"prompt", "reference (greedy)", "policy (greedy)",
                            "reference (sampled)", "policy (sampled)"}


def test_float16_trainable_weights_are_refused_with_the_fix():
    model, tok = tiny_model("gpt2")
    model.half()
    with pytest.raises(ValueError, match="float32 trainable weights"):
        train(model, tok, DATA, replace(CONFIG, dtype="float16"))


def test_accumulation_of_two_by_two_equals_one_batch_of_four(tiny_lora):
    """2 micro-batches of 2 pairs make the same steps as 1 batch of 4 (the sampler draws the
    same 4 pairs; each micro-batch's mean loss is divided by the accumulation steps)."""
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        config = replace(CONFIG, batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=4)
        runs[batch] = train(*tiny_lora(), DATA, config)
    one, two = runs[4], runs[2]
    assert one[-1]["loss"] < math.log(2) - 0.01  # it trained: the comparison is not trivial
    for a, b in zip(one, two, strict=True):
        for key in set(a) - TIMING:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
