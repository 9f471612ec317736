"""KTO on TRL's unpaired preference format: rows {"prompt", "completion", "label": bool}.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv 2402.01306): with the implicit reward r = log pi(y|x) - log pi_ref(y|x) and the reference
point z0 = max(0, mean log-ratio over mismatched (prompt, other completion) pairs), detached,

    desirable:    lambda_D (1 - sigma(beta (r - z0)))
    undesirable:  lambda_U (1 - sigma(beta (z0 - r)))

Checked here by hand, against TRL's KTOTrainer (1.16) on the same batch, through `train`
(learning, resuming bit for bit), and with hostile inputs.
"""

import json
import math
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from helpers import all_of, refused_before_training, without_timing

from dpo_minimal import evaluate, load_preferences, shipped_data_path, tiny_model
from dpo_minimal.data import collate_unpaired, tokenize_preferences
from dpo_minimal.logprobs import PairLogps
from dpo_minimal.models import course_tokenizer, fused_gelu
from dpo_minimal.train import (
    Reference,
    TrainConfig,
    batch_logps,
    kl_logps,
    metric_means,
    preference_step,
    train,
)

PAIRS = load_preferences(shipped_data_path("train")).select(range(16)).to_list()
USER = {"role": "user", "content": "Is the sky green?"}
YES = {"role": "assistant", "content": "Yes, it is green."}


def _unpaired(n: int) -> list[dict]:
    """n unpaired rows from n different pairs: even ones desirable (their chosen response),
    odd ones undesirable (their rejected one), so no prompt has both."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
             "label": i % 2 == 0} for i, p in enumerate(PAIRS[:n])]


def _sigmoid(u: float) -> float:
    return 1 / (1 + math.exp(-u))


# -- the loss, by hand --------------------------------------------------------------------------

POLICY = [-10.0, -12.5, -7.0, -20.0]
REFERENCE = [-11.0, -12.0, -7.5, -18.0]
LABELS = [True, False, True, False]


@pytest.mark.parametrize("kl_policy, kl_reference", [
    ([-9.0, -14.0, -8.0, -19.0], [-9.5, -14.2, -8.1, -19.6]),  # mean log-ratio 0.35: z0 = 0.35
    ([-9.0, -14.0, -8.0, -19.0], [-8.0, -14.2, -8.1, -19.6]),  # mean -0.15: clamped, z0 = 0
], ids=["z0_positive", "z0_clamped"])
def test_kto_step_is_the_papers_loss_by_hand(kl_policy, kl_reference):
    beta, lambda_d, lambda_u = 0.5, 1.3, 0.8
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_reference)) / 4)
    rewards = [p - r for p, r in zip(POLICY, REFERENCE)]
    expected = [lambda_d * (1 - _sigmoid(beta * (r - z0))) if d
                else lambda_u * (1 - _sigmoid(beta * (z0 - r))) for r, d in zip(rewards, LABELS)]
    config = TrainConfig(loss_type="kto", beta=beta, desirable_weight=lambda_d,
                         undesirable_weight=lambda_u)
    batch = {"label": torch.tensor(LABELS),
             "kl_logps": (torch.tensor(kl_policy), torch.tensor(kl_reference))}
    losses, sums = preference_step(torch.tensor(POLICY), torch.tensor(REFERENCE), batch, config)
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-6, rtol=0)
    means = metric_means(sums, 4)
    assert means["kl"] == pytest.approx(z0, abs=1e-6)
    assert means["rewards/chosen"] == pytest.approx(beta * (rewards[0] + rewards[2]) / 2)
    assert means["rewards/rejected"] == pytest.approx(beta * (rewards[1] + rewards[3]) / 2)
    assert means["logps/chosen"] == pytest.approx((POLICY[0] + POLICY[2]) / 2)
    assert means["rewards/margins"] == pytest.approx(
        means["rewards/chosen"] - means["rewards/rejected"])
    assert not any(key.startswith("count/") for key in means)


def test_a_step_without_undesirable_examples_leaves_their_metrics_out():
    config = TrainConfig(loss_type="kto")
    _, sums = preference_step(torch.tensor(POLICY), torch.tensor(REFERENCE),
                              {"label": torch.ones(4, dtype=torch.bool)}, config)
    means = metric_means(sums, 4)
    assert "rewards/chosen" in means and "kl" in means
    assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(means)


def test_paired_kto_uses_the_weights_and_its_own_completions_for_z0():
    beta, lambda_d, lambda_u = 0.5, 1.3, 0.8
    config = TrainConfig(loss_type="kto", beta=beta, desirable_weight=lambda_d,
                         undesirable_weight=lambda_u)
    # Pairs: chosen = POLICY[0], POLICY[2]; rejected = POLICY[1], POLICY[3].
    order = [0, 2, 1, 3]
    policy, reference = (PairLogps.from_rows(torch.tensor([x[i] for i in order]))
                         for x in (POLICY, REFERENCE))
    batch = {"loss_mask": torch.ones(4, 3)}
    losses, _ = preference_step(policy, reference, batch, config)
    rewards = [POLICY[i] - REFERENCE[i] for i in order]
    z0 = max(0.0, sum(rewards) / 4)  # the biased estimate: the batch's own log-ratios
    per_example = [lambda_d * (1 - _sigmoid(beta * (r - z0))) for r in rewards[:2]]
    per_example += [lambda_u * (1 - _sigmoid(beta * (z0 - r))) for r in rewards[2:]]
    expected = [(per_example[0] + per_example[2]) / 2, (per_example[1] + per_example[3]) / 2]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-6, rtol=0)


# -- data ---------------------------------------------------------------------------------------

def test_unpaired_rows_load_standard_and_conversational():
    rows = load_preferences([{"prompt": "Q?", "completion": " A.", "label": False, "id": 7}])
    assert rows.to_list() == [{"prompt": "Q?", "completion": " A.", "label": False, "id": 7}]
    (chat,) = load_preferences([{"prompt": [USER], "completion": [YES], "label": True}]).to_list()
    assert chat == {"prompt": "User: Is the sky green?\nAssistant:",
                    "completion": " Yes, it is green.", "label": True}


def test_collate_unpaired_borrows_the_previous_completion_for_the_kl_rows():
    examples = [{"prompt_ids": [1, 2], "completion_ids": [10, 11, 12], "label": True},
                {"prompt_ids": [3, 4, 5, 6], "completion_ids": [20], "label": False},
                {"prompt_ids": [7], "completion_ids": [30, 31], "label": True}]
    batch = collate_unpaired(examples, pad_token_id=0, max_length=6)
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11, 12], [3, 4, 5, 6, 20],
                                           [7, 30, 31, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 0, 0]]
    assert batch["label"].tolist() == [True, False, True]
    kl = batch["kl"]  # x_1 + y_3, x_2 + y_1 (cut to max_length=6), x_3 + y_2
    assert kl["input_ids"].tolist() == [[1, 2, 30, 31, 0, 0], [3, 4, 5, 6, 10, 11],
                                        [7, 20, 0, 0, 0, 0]]
    assert kl["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1],
                                        [0, 1, 0, 0, 0, 0]]
    assert kl["attention_mask"].sum(-1).tolist() == [4, 6, 2]


def test_tokenised_unpaired_rows_mask_the_prompt_and_end_with_eos():
    tok = course_tokenizer()
    (example,) = tokenize_preferences(load_preferences(_unpaired(1)), tok, 64, 32)
    assert set(example) == {"prompt_ids", "completion_ids", "label"} and example["label"]
    assert example["completion_ids"][-1] == tok.eos_token_id
    batch = collate_unpaired([example, example], tok.pad_token_id)
    masked = batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist()
    assert tok.decode(masked) == PAIRS[0]["chosen"] + tok.eos_token


# -- parity with TRL's KTOTrainer -----------------------------------------------------------------

BETA = 0.5
KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """TRL's KTOTrainer on six unpaired rows, one batch of six: its prepared data, its collated
    batch, and its LoRA model with the B weights moved off zero (so policy != reference and,
    with this seed, the mismatched pairs' mean log-ratio is positive: z0 > 0 is exercised)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig

    model, tokenizer = tiny_model("gpt2", seed=0)
    data = load_preferences(_unpaired(6))
    args = trl.KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl_kto")), use_cpu=True,
                         bf16=False, gradient_checkpointing=False, report_to="none", beta=BETA,
                         max_length=64, per_device_train_batch_size=6, desirable_weight=1.3,
                         undesirable_weight=0.8)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainer = trl.KTOTrainer(model=model, args=args, processing_class=tokenizer,
                             peft_config=lora, train_dataset=Dataset.from_list(data.to_list()))
    peft_model = trainer.model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    peft_model.train()
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    examples = tokenize_preferences(data, tokenizer, max_length=64, max_prompt_length=32)
    batch = {**collate_unpaired(examples, tokenizer.pad_token_id, 64), "index": torch.arange(6)}
    return trainer, peft_model, trl_batch, batch


def test_collated_batch_and_kl_rows_equal_trls(trl_setup):
    """Same tokens, masks and mismatched rows (TRL rotates completions by one, as we do)."""
    _, _, trl_batch, batch = trl_setup
    pairs = [("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
             ("completion_mask", "loss_mask")]
    for theirs, ours in pairs:
        assert torch.equal(trl_batch[theirs], batch[ours]), theirs
        assert torch.equal(trl_batch[f"KL_{theirs}"], batch["kl"][ours]), f"KL_{theirs}"
    assert torch.equal(trl_batch["label"].bool(), batch["label"])


@pytest.mark.parametrize("fused", [False, True], ids=["gelu_new", "fused_gelu"])
def test_kto_loss_and_metrics_match_trl(trl_setup, fused):
    trainer, model, trl_batch, batch = trl_setup
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(model, trl_batch).item()
    trl_metrics = {key: trainer._metrics["train"][key][-1] for key in KTO_METRICS}
    config = TrainConfig(beta=BETA, loss_type="kto", desirable_weight=1.3, undesirable_weight=0.8)
    with fused_gelu(model) if fused else nullcontext():
        policy = batch_logps(model, batch)
        reference = Reference().logps(model, batch)
        kl = kl_logps(model, batch, "float32")
    losses, sums = preference_step(policy, reference, {**batch, "kl_logps": kl}, config)
    ours = metric_means(sums, 6)
    tol = 1e-5 if fused else 1e-6  # fused_gelu: float rounding, as in test_trl_parity.py
    assert abs(losses.mean().item() - trl_loss) < tol
    assert trl_metrics["kl"] > 0.05  # the reference point is in play, not clamped to 0
    for key in KTO_METRICS:
        assert ours[key] == pytest.approx(trl_metrics[key], abs=tol, rel=1e-6), key


# -- training -----------------------------------------------------------------------------------

CONFIG = TrainConfig(loss_type="kto", batch_size=4, max_steps=12, max_length=64,
                     max_prompt_length=32, learning_rate=1e-2, progress=False)


def test_training_raises_desirable_log_probs_relative_to_undesirable_ones(tmp_path, tiny_lora):
    rows = _unpaired(12)
    path = tmp_path / "unpaired.jsonl"  # the file path, as a user would pass it
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model, tok = tiny_lora()
    config = CONFIG
    before = evaluate(model, tok, rows, config)
    assert before["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - sigma(0)
    assert before["rewards/margins"] == 0 and before["kl"] == 0
    history = train(model, tok, str(path), config)
    after = evaluate(model, tok, rows, config)
    gap_before = before["logps/chosen"] - before["logps/rejected"]
    gap_after = after["logps/chosen"] - after["logps/rejected"]
    assert gap_after > gap_before + 1.0
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]
    assert after["loss"] < before["loss"]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(history[0])
    assert "rewards/accuracies" not in history[0]  # no pairs to win


def test_interrupted_kto_run_resumes_bit_for_bit(tmp_path, monkeypatch, interrupt_update,
                                                 tiny_lora):
    rows, held_out = _unpaired(12), _unpaired(16)[12:]
    settings = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=6, eval_every=2,
                    warmup_steps=1, save_steps=2)

    def run(folder, **extra):
        return train(*tiny_lora(), rows, replace(CONFIG, output_dir=str(tmp_path / folder),
                                                 **settings), eval_data=held_out, **extra)

    whole = run("whole")
    interrupt_update(4)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("cut")
    monkeypatch.undo()
    assert caught.value.checkpoint.name == "checkpoint-3"
    resumed = run("cut", resume_from=True)
    assert without_timing(resumed) == without_timing(whole)
    assert "eval/kl" in resumed[-1]


# -- hostile inputs -----------------------------------------------------------------------------

ROW = {"prompt": "Is the sky green?", "completion": " Yes.", "label": True}


@pytest.mark.parametrize("row, words", [
    ({**ROW, "label": 1}, all_of("row 0", "'label'", "true or false", "int", "not 1/0")),
    ({**ROW, "label": "yes"}, all_of("row 0", "'label'", "true or false", "str")),
    ({"prompt": "q", "label": True}, all_of("row 0", "(?i)missing", "'completion'", "label")),
    ({"prompt": "q", "completion": " a"}, all_of("row 0", "(?i)missing", "'label'", "true")),
    ({"completion": " a", "label": False}, all_of("row 0", "(?i)missing", "'prompt'")),
    ({**ROW, "completion": "  "}, all_of("row 0", "'completion'", "(?i)empty")),
    ({**ROW, "completion": 3}, all_of("row 0", "'completion'", "(?i)str")),
    ({**ROW, "chosen": "a", "rejected": "b"}, all_of("row 0", "chosen", "completion",
                                                     "one format per row")),
    ({"prompt": [USER], "completion": [USER], "label": True},
     all_of("row 0", "completion", "assistant")),
    ({"prompt": [USER], "completion": " Yes.", "label": True},
     all_of("row 0", "(?i)mixes formats", "message")),
], ids=["label_int", "label_str", "no_completion", "no_label", "no_prompt", "empty_completion",
        "completion_int", "pair_and_unpaired_columns", "completion_not_assistant",
        "messages_and_string"])
def test_bad_unpaired_row_is_refused(row, words):
    with pytest.raises(ValueError, match=words):
        load_preferences([row])


def test_a_file_mixing_pairs_and_unpaired_rows_names_both_lines(tmp_path):
    path = tmp_path / "prefs.jsonl"
    pair = {"prompt": "q", "chosen": " a", "rejected": " b"}
    path.write_text("\n".join(json.dumps(r) for r in (pair, ROW, pair)) + "\n")
    words = all_of(r"prefs\.jsonl: line 1\b", r"prefs\.jsonl: line 2\b", "(?i)mixes formats",
                   "label true")
    with pytest.raises(ValueError, match=words):
        load_preferences(path)


@pytest.mark.parametrize("change, exc, words", [
    (dict(loss_type="sigmoid"), ValueError, all_of("unpaired", "loss_type='sigmoid'",
                                                   "loss_type='kto'", "chosen, rejected")),
    (dict(batch_size=1), ValueError, all_of("batch_size=1", "batch_size >= 2")),
], ids=["not_kto", "batch_of_one"])
def test_unpaired_training_refused_before_any_work(change, exc, words, tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, exc, words):
        train(model, tok, _unpaired(4), replace(CONFIG, **change))


def test_unpaired_full_fine_tuning_is_refused_before_any_work():
    model, tok = tiny_model("gpt2")
    with refused_before_training(model, ValueError, all_of("full fine-tuning", "add_lora")):
        train(model, tok, _unpaired(4), CONFIG)


@pytest.mark.parametrize("kwargs, words", [
    (dict(loss_type="kto", desirable_weight=0.0), all_of("desirable_weight", "> 0")),
    (dict(loss_type="kto", undesirable_weight=math.nan), all_of("undesirable_weight", "finite")),
    (dict(loss_type="sigmoid", desirable_weight=1.5),
     all_of("desirable_weight", "'sigmoid'", "loss_type='kto'")),
    (dict(loss_type="kto", desirable_weight=True), all_of("desirable_weight", "float")),
], ids=["zero", "nan", "not_kto", "bool"])
def test_bad_kto_weights_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kwargs)


def test_preference_step_refuses_an_unpaired_batch_for_another_loss():
    with pytest.raises(ValueError, match=all_of("unpaired", "loss_type='kto'")):
        preference_step(torch.tensor(POLICY), torch.tensor(REFERENCE),
                        {"label": torch.tensor(LABELS)}, TrainConfig(loss_type="sigmoid"))
