"""Preference data: loading, checking, tokenising and collating (x, y_w, y_l) pairs."""

import json
import warnings
from pathlib import Path

import torch
from datasets import Dataset

DATA_DIR = Path(__file__).parent / "data"
SHIPPED = {
    "train": DATA_DIR / "truthy_mini_train.jsonl",
    "test": DATA_DIR / "truthy_mini_test.jsonl",
    "conversations": DATA_DIR / "conversations_mini.jsonl",
}
COLUMNS = ("prompt", "chosen", "rejected")


class OverlongPromptError(ValueError):
    """A prompt alone fills max_length, so its pair has no response tokens left to train."""


def shipped_data_path(split: str = "train") -> Path:
    """Path of a preference file shipped with the package: 'train', 'test' or 'conversations'."""
    if split not in SHIPPED:
        raise ValueError(f"unknown shipped split {split!r}: use one of {', '.join(SHIPPED)}.")
    return SHIPPED[split]


def _read_rows(source, split: str) -> list[dict]:
    if isinstance(source, Dataset):
        return source.to_list()
    if isinstance(source, list):
        return source
    path = Path(source)
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}.")
        return rows
    if path.exists():
        raise ValueError(f"{path}: use a .jsonl or .json file.")
    from datasets import load_dataset  # a Hub name: full mode, needs the network

    return load_dataset(str(source), split=split).to_list()


def _render(messages: list, where: str) -> str:
    """Messages as plain text, one 'Role: content' line each (the course tokenizer has no chat
    template)."""
    lines = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}, message {k}: every message needs 'role' and 'content' "
                             f"keys, e.g. {{'role': 'user', 'content': '...'}}; got {message!r}.")
        lines.append(f"{str(message['role']).capitalize()}: {message['content']}")
    return "\n".join(lines)


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _normalise(row: dict, i: int) -> dict:
    """One row in any TRL format -> plain-text prompt, chosen, rejected."""
    where = f"row {i}"
    for column in ("chosen", "rejected"):
        if column not in row:
            raise ValueError(f"{where}: missing column {column!r}; every row needs 'chosen' and "
                             "'rejected' (and 'prompt', unless it is implicit in both).")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None and "prompt" not in row:  # implicit prompt: the shared start of both
        if isinstance(chosen, list) and isinstance(rejected, list):
            n = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(chosen, str) and isinstance(rejected, str):
            n = _common_prefix(chosen, rejected)
            n = chosen.rfind(" ", 0, n + 1) if n < len(chosen) else n  # cut at a word boundary
            prompt, chosen, rejected = chosen[:max(n, 0)], chosen[max(n, 0):], rejected[max(n, 0):]
        if not prompt:
            raise ValueError(f"{where}: no 'prompt' column and chosen/rejected share no prompt; "
                             "add a 'prompt' column.")
    out = {}
    for column, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            value = _render(value, f"{where}, column {column!r}")
            if column == "prompt":
                value += "\nAssistant:"
            else:  # a reply: drop the 'Assistant: ' the renderer put in front
                value = " " + value.split(": ", 1)[1] if value.startswith("Assistant: ") else value
        if not isinstance(value, str):
            raise ValueError(f"{where}, column {column!r}: expected a string or a list of "
                             f"messages, got {type(value).__name__}; fix or drop the row.")
        out[column] = value
    for column in ("chosen", "rejected"):
        if not out[column].strip():
            raise ValueError(f"{where}, column {column!r}: the response is empty; a pair needs "
                             "two non-empty responses, so fix or drop the row.")
    if out["chosen"].strip() == out["rejected"].strip():
        raise ValueError(f"{where}: chosen == rejected, which carries no preference; "
                         "fix or drop the row.")
    return out


def load_preferences(source, split: str = "train", prompt_template: str | None = None) -> Dataset:
    """Load preference pairs as a Dataset with string columns prompt, chosen and rejected.

    Args:
        source: a .jsonl/.json path, a list of dicts, a `datasets.Dataset`, or a Hub name
            (e.g. "jondurbin/truthy-dpo-v0.1"; full mode, needs the network).
        split: the split to load for a Hub name.
        prompt_template: optional format string applied to each prompt, with fields {prompt}
            and, if the data has that column, {system}; e.g. "Instruct: {prompt}\nOutput:".

    Accepts TRL's formats: standard (strings), conversational (lists of {"role", "content"}
    messages, rendered as "Role: content" lines, the prompt ending with "Assistant:") and
    implicit prompt (no prompt column: the shared start of chosen and rejected is the prompt).
    Other columns (e.g. "system") are kept. Bad rows raise ValueError naming the row and column.
    """
    rows = _read_rows(source, split)
    if not rows:
        raise ValueError("the preference data set is empty: it needs at least one pair.")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected a dict with prompt/chosen/rejected, got "
                             f"{type(row).__name__}.")
        extra = {k: v for k, v in row.items() if k not in COLUMNS}
        pair = _normalise(row, i)
        if prompt_template is not None:
            pair["prompt"] = prompt_template.format(prompt=pair["prompt"], system=row.get("system"))
        out.append({**pair, **extra})
    return Dataset.from_list(out)


def check_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token = "
                         "tokenizer.eos_token (load_model and tiny_model do this).")


def tokenize_pair(example: dict, tokenizer, max_length: int,
                  max_prompt_length: int | None = None) -> dict:
    """Token ids of one pair, with the course's truncation rule.

    1. The prompt is cut from the LEFT to its last `max_prompt_length` tokens (the question
       usually sits at its end); None keeps it whole.
    2. Each response, with an EOS appended, is cut from the RIGHT so that prompt + response
       fits in `max_length`.
    A prompt that alone fills `max_length` leaves no response to train on and raises.
    Returns prompt_ids, chosen_ids, rejected_ids (lists of ints).
    """
    texts = [example["prompt"], example["chosen"], example["rejected"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return _truncate(*ids, tokenizer, max_length, max_prompt_length)


def _truncate(prompt_ids, chosen_ids, rejected_ids, tokenizer, max_length: int,
              max_prompt_length: int | None) -> dict:
    """tokenize_pair's truncation rule on already encoded texts."""
    if max_prompt_length is not None and max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every response; set one.")
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise OverlongPromptError(
            f"the prompt alone has {len(prompt_ids)} tokens, which fills max_length={max_length}: "
            "raise max_length, set max_prompt_length below it, or drop such pairs "
            "(drop_overlong=True in tokenize_preferences or TrainConfig).")
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": (chosen_ids + [tokenizer.eos_token_id])[:room],
        "rejected_ids": (rejected_ids + [tokenizer.eos_token_id])[:room],
    }


def tokenize_preferences(data, tokenizer, max_length: int, max_prompt_length: int | None = None,
                         drop_overlong: bool = False) -> list[dict]:
    """tokenize_pair over a data set (rows with prompt, chosen, rejected).

    Every text goes to the tokenizer in one batched call (a fast tokenizer then encodes them
    together); the ids are the same as pair by pair. A pair whose prompt alone fills
    `max_length` raises, naming its row; with `drop_overlong=True` such pairs are dropped instead
    and counted in a warning. A data set left empty raises.
    """
    check_pad_token(tokenizer)
    rows = list(data)
    texts = [row[column] for row in rows for column in ("prompt", "chosen", "rejected")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, dropped = [], []
    for i in range(len(rows)):
        try:
            out.append(_truncate(*ids[3 * i: 3 * i + 3], tokenizer, max_length,
                                 max_prompt_length))
        except OverlongPromptError as err:
            if not drop_overlong:
                raise OverlongPromptError(f"row {i}: {err}") from None
            dropped.append(i)
        except ValueError as err:
            raise ValueError(f"row {i}: {err}") from None
    if dropped:
        warnings.warn(f"dropped {len(dropped)} of {len(data)} pairs whose prompt fills "
                      f"max_length={max_length} (rows {dropped[:10]}); raise max_length or set "
                      "max_prompt_length to keep them.", stacklevel=2)
    if not out:
        raise ValueError(f"no pairs left after tokenising {len(data)} rows with max_length="
                         f"{max_length}, max_prompt_length={max_prompt_length}; raise the limits.")
    return out


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict:
    """Stack B tokenised pairs into one (2B, T) batch: rows 0..B-1 chosen, B..2B-1 rejected.

    Right padding to the batch's own longest row. `loss_mask` is 1 on response tokens only, so
    the prompt and the padding are never trained.
    """
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        input_ids[r, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[r, : n + m] = 1
        loss_mask[r, n : n + m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
