"""load_preferences (formats, bad rows), tokenisation, truncation and the loss mask."""

import json

import pytest
from datasets import Dataset

from dpo_minimal import collate_pairs, load_preferences, shipped_data_path, tokenize_preferences
from dpo_minimal.models import course_tokenizer

TOK = course_tokenizer()
ROW = {"prompt": "Can you smell coffee?", "chosen": " I have no senses.",
       "rejected": " Yes, lovely."}



def test_shipped_data_counts_and_split():
    train = load_preferences(shipped_data_path("train"))
    test = load_preferences(shipped_data_path("test"))
    assert len(train) >= 200 and len(test) >= 40
    assert not set(train["prompt"]) & set(test["prompt"])  # the split is fixed and disjoint
    conv = load_preferences(shipped_data_path("conversations"))
    assert len(conv) >= 10 and all(p.endswith("Assistant:") for p in conv["prompt"])


def test_sources_list_dataset_and_files(tmp_path):
    as_list = load_preferences([ROW])
    as_dataset = load_preferences(Dataset.from_list([ROW]))
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([ROW]))
    for ds in (as_dataset, load_preferences(tmp_path / "a.jsonl"),
               load_preferences(str(tmp_path / "a.json"))):
        assert ds.to_list() == as_list.to_list() == [ROW]


def test_conversational_format():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Where are you?"}],
        "chosen": [{"role": "assistant", "content": "I have no location."}],
        "rejected": [{"role": "assistant", "content": "In Paris."}],
    }
    (out,) = load_preferences([row]).to_list()
    assert out == {"prompt": "System: Be brief.\nUser: Where are you?\nAssistant:",
                   "chosen": " I have no location.", "rejected": " In Paris."}


def test_implicit_prompt_strings_and_messages():
    (out,) = load_preferences([{"chosen": "Q: Is it hot? A: Mild today.",
                                "rejected": "Q: Is it hot? A: Boiling."}]).to_list()
    assert out == {"prompt": "Q: Is it hot? A:", "chosen": " Mild today.", "rejected": " Boiling."}
    user = {"role": "user", "content": "Hi?"}
    (out,) = load_preferences([{
        "chosen": [user, {"role": "assistant", "content": "Hello."}],
        "rejected": [user, {"role": "assistant", "content": "Go away."}],
    }]).to_list()
    assert out == {"prompt": "User: Hi?\nAssistant:", "chosen": " Hello.", "rejected": " Go away."}


def test_extra_columns_are_kept():
    (out,) = load_preferences([{**ROW, "system": "You are honest.", "id": "x"}]).to_list()
    assert out["system"] == "You are honest." and out["id"] == "x"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, r"row 1: missing column 'rejected'"),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, r"row 1, column 'chosen'.*string"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"row 1, column 'prompt'.*string"),
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, r"row 1, column 'chosen'.*empty"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, r"row 1, column 'chosen'.*empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"row 1: chosen == rejected"),
        ({"prompt": [{"content": "hi"}], "chosen": "a", "rejected": "b"},
         r"row 1, column 'prompt', message 0.*'role'"),
        ({"chosen": "abc", "rejected": "xyz"}, r"row 1: no 'prompt' column"),
    ],
)
def test_bad_rows_name_row_column_and_fix(row, message):
    with pytest.raises(ValueError, match=message):
        load_preferences([ROW, row])


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="empty"):
        load_preferences([])


def test_eos_appended_and_prompt_masked_out():
    (pair,) = tokenize_preferences([ROW], TOK, max_length=64, max_prompt_length=32)
    assert pair["chosen_ids"][-1] == TOK.eos_token_id
    assert pair["rejected_ids"][-1] == TOK.eos_token_id
    batch = collate_pairs([pair], TOK.pad_token_id)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    trained = [TOK.decode(ids[r][mask[r].bool()]) for r in range(2)]
    untrained = [TOK.decode(ids[r][(1 - mask[r]).bool() & batch["attention_mask"][r].bool()])
                 for r in range(2)]
    # Decoded back to text: only the responses (and their EOS) are trained, never the prompt.
    assert trained == [ROW["chosen"] + "<|endoftext|>", ROW["rejected"] + "<|endoftext|>"]
    assert untrained == [ROW["prompt"], ROW["prompt"]]


def test_padding_is_neither_attended_nor_trained():
    pairs = tokenize_preferences([ROW, {**ROW, "chosen": " A much longer honest answer here."}],
                                 TOK, max_length=64)
    batch = collate_pairs(pairs, TOK.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["loss_mask"][pad] == 0).all()


def test_truncation_keeps_prompt_end_and_response_start():
    prompt_ids = TOK("one two three four five six seven eight nine ten",
                     add_special_tokens=False)["input_ids"]
    chosen_ids = TOK(" alpha beta gamma delta epsilon zeta eta theta",
                     add_special_tokens=False)["input_ids"]
    example = {"prompt": "one two three four five six seven eight nine ten",
               "chosen": " alpha beta gamma delta epsilon zeta eta theta", "rejected": " no"}
    (out,) = tokenize_preferences([example], TOK, max_length=9, max_prompt_length=4)
    assert out["prompt_ids"] == prompt_ids[-4:]  # cut from the left
    assert out["chosen_ids"] == chosen_ids[:5]  # cut from the right, no room left for EOS
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 9
    no_ids = TOK(" no", add_special_tokens=False)["input_ids"]
    assert out["rejected_ids"] == no_ids + [TOK.eos_token_id]  # short enough: untouched


def test_prompt_that_fills_max_length_raises_or_is_counted():
    long_row = {**ROW, "prompt": "word " * 50}
    with pytest.raises(ValueError, match="row 1: the prompt alone has .* fills max_length"):
        tokenize_preferences([ROW, long_row], TOK, max_length=20)
    with pytest.warns(UserWarning, match="dropped 1 of 2 pairs"):
        out = tokenize_preferences([ROW, long_row], TOK, max_length=20, drop_overlong=True)
    assert len(out) == 1
    with pytest.raises(ValueError, match="no pairs left"), pytest.warns(UserWarning):
        tokenize_preferences([long_row], TOK, max_length=20, drop_overlong=True)


def test_tokenizer_without_pad_token_raises():
    tok = course_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token = "):
        tokenize_preferences([ROW], tok, max_length=64)


def test_prompt_template():
    (out,) = load_preferences([{**ROW, "system": "Be honest."}],
                              prompt_template="{system}\nInstruct: {prompt}\nOutput:").to_list()
    assert out["prompt"] == "Be honest.\nInstruct: Can you smell coffee?\nOutput:"


def test_batched_tokenization_equals_pair_by_pair():
    tok = course_tokenizer()
    data = load_preferences(shipped_data_path("train"))
    batched = tokenize_preferences(data, tok, max_length=48, max_prompt_length=8)
    assert batched == [tokenize_preferences([row], tok, 48, 8)[0] for row in data]
    for row, pair in zip(data, batched, strict=True):  # and each text encoded on its own
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"][-8:]
        chosen = tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert pair["prompt_ids"] == prompt
        assert pair["chosen_ids"] == chosen[: 48 - len(prompt)]
    assert any(len(p["prompt_ids"]) == 8 for p in batched)  # the prompt rule did cut some
    assert any(len(p["prompt_ids"]) + len(p["chosen_ids"]) == 48 for p in batched)
