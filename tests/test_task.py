"""The task world: its judge, its shipped data, the sampling helpers and the pretrained model."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, PhiForCausalLM

from dpo_minimal import add_lora, load_preferences, tiny_model
from dpo_minimal.course import task
from dpo_minimal.data import DATA_DIR
from dpo_minimal.models import PRETRAINED_DIR

SHIPPED_ARCHS = {"gpt2": GPT2LMHeadModel, "phi": PhiForCausalLM}

ROOT = Path(__file__).resolve().parents[1]
AUS = task.render("What is the capital of Australia?")


def _rows(name):
    return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines()]


def test_every_fact_scores_one_right_one_third_for_its_slip():
    all_facts = task.facts()
    assert len(all_facts) == len({f.question for f in all_facts}) == 184
    for fact in all_facts:
        prompt = task.render(fact.question)
        assert task.reward(prompt, " " + fact.sentence(right=True)) == 1.0
        assert task.reward(prompt, " " + fact.sentence(right=False)) == pytest.approx(1 / 3)
        assert task.reward(prompt, fact.sentence() + " I hope this helps.") == pytest.approx(5 / 6)
        assert fact.slip != fact.answer


@pytest.mark.parametrize("response, expected", [
    ("The capital of Australia is Canberra.", 1.0),
    ("  the  CAPITAL of australia is canberra!  ", 1.0),
    ("The capital of Australia is Canberra", 5 / 6),  # stops mid-sentence: counts as rambling
    ("The capital of Australia is Canberra. Thank you for asking. I hope this helps.", 7 / 9),
    ("The capital of Australia is Sydney.", 1 / 3),
    ("The capital of Australia is not Canberra.", 1 / 3),
    ("The capital of Austria is Canberra.", 0.0),  # names another country: off topic
    ("Canberra.", 0.0),  # no subject
    ("", 0.0), ("   \n\t", 0.0), ("...", 0.0), ("\x00\u2603 ?! ??", 0.0), ("x" * 10_000, 0.0),
])
def test_reward_of_any_string(response, expected):
    assert task.reward(AUS, response) == pytest.approx(expected)
    assert 0.0 <= task.reward(AUS, response) <= 1.0


def test_reward_accepts_bare_question_and_rejects_foreign_prompts():
    line = "The capital of Australia is Canberra."
    assert task.reward("What is the capital of Australia?", line) == 1.0
    assert task.reward("What is 3 plus 5?", "3 plus 5 is 8.") == 1.0
    assert task.reward("What is 3 plus 5?", "3 plus 5 is 18.") == pytest.approx(1 / 3)
    assert task.reward("How many minutes are in 1 hour?", "1 hour is 60 minutes.") == 1.0
    with pytest.raises(ValueError, match="not a question of the task world"):
        task.reward("What is the capital of Atlantis?", line)
    with pytest.raises(TypeError, match="response must be a string"):
        task.reward(AUS, None)


def test_shipped_files_are_a_byte_exact_rebuild():
    script = ROOT / "scripts" / "make_task_data.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    size = sum((DATA_DIR / name).stat().st_size for name in
               ("task_sft.jsonl", "task_prefs_train.jsonl", "task_prefs_test.jsonl",
                "task_heldout.jsonl"))
    assert size < 1_000_000


@pytest.mark.parametrize("name", ["task_prefs_train.jsonl", "task_prefs_test.jsonl"])
def test_pairs_are_ordered_by_the_true_reward_and_load(name):
    rows = _rows(name)
    assert {r["pair_type"] for r in rows} == {"slip", "rambling"}
    for row in rows:
        prompt = row["prompt"]
        assert task.reward(prompt, row["chosen"]) > task.reward(prompt, row["rejected"])
    assert len(load_preferences(DATA_DIR / name)) == len(rows)


def test_heldout_facts_are_in_the_sft_corpus_but_in_no_training_pair():
    heldout = {r["prompt"] for r in _rows("task_heldout.jsonl")}
    assert len(heldout) == 46
    assert {r["prompt"] for r in _rows("task_prefs_test.jsonl")} <= heldout
    assert not heldout & {r["prompt"] for r in _rows("task_prefs_train.jsonl")}
    assert heldout < {r["prompt"] for r in _rows("task_sft.jsonl")}


def test_sft_demonstrator_is_right_and_brief_about_half_the_time():
    parts = [task.judge(r["prompt"], r["completion"]) for r in _rows("task_sft.jsonl")]
    assert all(p["on_topic"] for p in parts)
    assert 0.45 < sum(p["correct"] for p in parts) / len(parts) < 0.55
    assert 0.45 < sum(p["brief"] == 1.0 for p in parts) / len(parts) < 0.55


def test_pairs_are_two_demonstrator_answers_so_chosen_is_better_not_perfect():
    rows = _rows("task_prefs_train.jsonl")
    chosen = [task.judge(r["prompt"], r["chosen"]) for r in rows]
    right = sum(c["correct"] for c in chosen) / len(rows)
    assert 0.7 < right < 0.9  # P(one of two is right) = 0.75, given no tie: about 0.8
    assert any(c["correct"] and c["brief"] < 1 for c in chosen)  # right but rambling ...
    assert any(not c["correct"] for c in chosen)  # ... and the slip said more briefly
    for row in rows:
        parts = task.judge(row["prompt"], row["chosen"]), task.judge(row["prompt"], row["rejected"])
        assert (row["pair_type"] == "slip") == (parts[0]["correct"] != parts[1]["correct"])


def test_win_rate_counts_ties_separately():
    policy = torch.tensor([[1.0, 1 / 3], [1.0, 0.0]])
    reference = torch.tensor([[1 / 3, 1 / 3], [1.0, 1.0]])
    assert task.win_rate(policy, reference) == {
        "wins": 1, "ties": 2, "losses": 1, "win_rate": 0.5, "tie_rate": 0.5}
    assert task.win_rate(policy, policy)["win_rate"] != task.win_rate(policy, policy)["win_rate"]
    with pytest.raises(ValueError, match="shapes differ"):
        task.win_rate(policy, reference[:1])


@pytest.mark.parametrize("arch", SHIPPED_ARCHS)
def test_pretrained_weights_match_their_recipe(arch):
    folder = PRETRAINED_DIR / arch
    weights = folder / "model.safetensors"
    recipe = (folder / "RECIPE.md").read_text()
    assert f'tiny_model("{arch}", pretrained=True)' in recipe
    digest = re.search(r"sha256 `([0-9a-f]{64})`", recipe)
    assert digest and hashlib.sha256(weights.read_bytes()).hexdigest() == digest.group(1)
    assert weights.stat().st_size <= 10 * 2**20


def test_every_shipped_folder_is_tested():
    assert sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir()) == sorted(SHIPPED_ARCHS)


@pytest.fixture(scope="module", params=sorted(SHIPPED_ARCHS))
def pretrained(request):
    return tiny_model(request.param, pretrained=True)


def test_pretrained_model_loads_ready_to_generate(pretrained):
    model, tok = pretrained
    assert isinstance(model, SHIPPED_ARCHS[model.config.model_type]) and not model.training
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tok)
    assert tok.pad_token_id == model.generation_config.pad_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="no pretrained weights"):
        tiny_model("llama", pretrained=True)


def test_pretrained_model_is_fluent_but_only_partly_right(pretrained):
    model, tok = pretrained
    prompts = [r["prompt"] for r in _rows("task_heldout.jsonl")][::4]
    rows = task.sample(model, tok, prompts, n_samples=4, max_new_tokens=48, seed=0)
    parts = [task.judge(r["prompt"], y) for r in rows for y in r["responses"]]
    on_topic = sum(p["on_topic"] for p in parts) / len(parts)
    correct = sum(p["correct"] for p in parts) / len(parts)
    brief = sum(p["brief"] == 1.0 for p in parts) / len(parts)
    assert on_topic > 0.9, on_topic  # fluent task text: the answer names the question's subject
    assert 0.2 < correct < 0.8, correct  # right only part of the time: room for DPO
    assert 0.2 < brief < 0.8, brief


def test_sample_is_seeded_per_prompt_and_reference_disables_the_adapter(pretrained):
    model, tok = pretrained
    prompts = [task.render(f.question) for f in task.facts()[:3]]
    rows = task.sample(model, tok, prompts, n_samples=3, seed=5)
    alone = task.sample(model, tok, prompts[2:], n_samples=3, seed=7)  # prompt 2 gets seed 7
    assert rows[2]["response_ids"] == alone[0]["response_ids"]
    for ids in rows[0]["response_ids"]:
        assert ids[-1] == tok.eos_token_id or len(ids) == 32
    rewards, texts = task.sample_rewards(model, tok, prompts, n_samples=3, seed=5)
    assert rewards.shape == (3, 3) and texts == [r["responses"] for r in rows]
    peft = add_lora(tiny_model(model.config.model_type, pretrained=True)[0], r=4)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))  # a LoRA that changes the outputs
    assert task.sample(peft, tok, prompts, 3, seed=5, reference=True) == rows
    assert task.sample(peft, tok, prompts, 3, seed=5) != rows
    with pytest.raises(ValueError, match="temperature"):
        task.sample(model, tok, prompts, temperature=0)


def test_pretrained_greedy_answers_are_rewarded_task_sentences(pretrained):
    model, tok = pretrained
    prompts = [r["prompt"] for r in _rows("task_heldout.jsonl")][::3]
    answers = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=32)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    parts = [task.judge(p, y) for p, y in zip(prompts, answers)]
    assert all(y.strip().endswith(".") for y in answers), answers  # whole sentences
    assert sum(p["on_topic"] for p in parts) / len(parts) > 0.9, answers
    assert sum(p["reward"] for p in parts) / len(parts) > 0.2, answers
