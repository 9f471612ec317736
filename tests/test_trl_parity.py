"""Numerics parity with TRL's DPOTrainer (1.16): same collated batch, same losses and metrics.

One tiny GPT-2 with a LoRA adapter whose B weights are perturbed (so the policy differs from the
reference, the adapter-disabled model, and the loss is not ln 2) is scored both ways on one
batch from our collate_pairs: TRL's `compute_loss` (its fused LM head) and our trainer's path.
Skipped when trl is not installed (it is the `bench` extra).
"""

import math
from contextlib import nullcontext

import pytest
import torch

trl = pytest.importorskip("trl")

from dpo_minimal import (  # noqa: E402  # noqa: E402
    collate_pairs,
    dpo_loss,
    load_preferences,
    sequence_logps,
    shipped_data_path,
    tiny_model,
    tokenize_preferences,
)
from dpo_minimal.models import fused_gelu  # noqa: E402
from dpo_minimal.train import (  # noqa: E402
    Reference,
    TrainConfig,
    batch_logps,
    preference_step,
)

BETA = 0.5
TOL = 1e-6
# fused_gelu changes the forward by float rounding (~1 ulp per activation), so its summed
# log-probs (about -300 here, where float32's spacing is 3e-5) move by that much, and the loss
# and metrics by up to ~1e-5 x beta. Bit-for-bit parity is the unfused path's, at TOL.
TOL_FUSED = 1e-5
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig

    model, tokenizer = tiny_model("gpt2", seed=0)
    data = load_preferences(shipped_data_path("train")).select(range(6))
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True,
                         bf16=False, gradient_checkpointing=False, report_to="none",
                         beta=BETA, max_length=64, per_device_train_batch_size=6)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                             train_dataset=Dataset.from_list(data.to_list()))
    peft_model = trainer.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 would make policy == reference; move it off zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    peft_model.train()  # TRL's "train" metrics; it has already set every dropout to 0
    pairs = tokenize_preferences(data, tokenizer, max_length=64, max_prompt_length=32)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    return trainer, peft_model, pairs, batch


def _trl(trainer, model, batch, loss_type, label_smoothing=0.0):
    """TRL's loss and metrics on our batch (its collator's keys: completion_mask = loss_mask)."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = label_smoothing
    trainer._metrics["train"].clear()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["loss_mask"]}
    loss = trainer.compute_loss(model, inputs)
    metrics = {key: trainer._metrics["train"][key][-1] for key in METRICS}
    return loss.item(), metrics


def _ours(model, pairs, batch, loss_type, label_smoothing=0.0, fused=False):
    """Our trainer's path: concatenated forward, disabled-adapter reference, dpo_loss.

    With `fused`, GPT-2's gelu_new runs as one kernel, as it does in `train` by default.
    """
    config = TrainConfig(beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing)
    with fused_gelu(model) if fused else nullcontext():
        policy = batch_logps(model, batch)
        reference = Reference().logps(model, batch)
    losses, sums = preference_step(policy, reference, batch, config)
    n = len(pairs)
    rows = torch.cat(tuple(policy)), torch.cat(tuple(reference))  # TRL's row order
    return losses.mean().item(), {key: sums[key] / n for key in METRICS}, *rows


@pytest.mark.parametrize("fused", [False, True], ids=["gelu_new", "fused_gelu"])
@pytest.mark.parametrize("loss_type, label_smoothing",
                         [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_loss_and_metrics_match_trl(setup, loss_type, label_smoothing, fused):
    trainer, model, pairs, batch = setup
    trl_loss, trl_metrics = _trl(trainer, model, batch, loss_type, label_smoothing)
    our_loss, our_metrics, policy, reference = _ours(model, pairs, batch, loss_type,
                                                     label_smoothing, fused)
    tol = TOL_FUSED if fused else TOL
    assert abs(our_loss - trl_loss) < tol
    assert abs(our_loss - math.log(2)) > 1e-2  # the perturbed adapter moved the policy
    if loss_type == "ipo":  # our IPO rewards are per-token averaged, TRL logs summed ones
        our_metrics = _summed_rewards(policy, reference, batch)
    for key in METRICS:
        assert our_metrics[key] == pytest.approx(trl_metrics[key], abs=tol, rel=TOL), key
    assert our_metrics["rewards/margins"] != 0


def _summed_rewards(policy, reference, batch):
    """IPO's metrics with beta * summed log-ratios (TRL's rewards/* for every loss type)."""
    b = policy.shape[0] // 2
    lengths = batch["loss_mask"].sum(-1).float()
    _, chosen, rejected = dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:],
                                   beta=BETA, loss_type="ipo", chosen_lengths=lengths[:b],
                                   rejected_lengths=lengths[b:])
    chosen, rejected = chosen * lengths[:b], rejected * lengths[b:]  # undo the averaging
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "logps/chosen": policy[:b].mean().item(), "logps/rejected": policy[b:].mean().item()}


def test_summed_logps_match_trl_fused_head(setup):
    """Per row: TRL's fused-head token log-probs, summed, equal ours (policy and reference)."""
    trainer, model, pairs, batch = setup
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=labels, fused_lm_head=True, use_cache=False)
    with torch.no_grad():
        trl_policy = model(**kwargs).log_probs.sum(1)
        with model.disable_adapter():
            trl_reference = model(**kwargs).log_probs.sum(1)
        _, _, policy, reference = _ours(model, pairs, batch, "sigmoid")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits
        public = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    torch.testing.assert_close(policy, trl_policy, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(reference, trl_reference, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(public, policy, atol=1e-4, rtol=1e-6)
    assert not torch.allclose(policy, reference)
    # And dpo_loss on TRL's log-probs gives TRL's loss.
    b = len(pairs)
    losses, _, _ = dpo_loss(trl_policy[:b], trl_policy[b:], trl_reference[:b], trl_reference[b:],
                            beta=BETA)
    trl_loss, _ = _trl(trainer, model, batch, "sigmoid")
    assert abs(losses.mean().item() - trl_loss) < TOL
