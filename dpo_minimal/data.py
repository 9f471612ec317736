"""Preference data: loading, checking, tokenising and collating (x, y_w, y_l) pairs."""

import json
import re
import warnings
from pathlib import Path

import torch
from datasets import Dataset

DATA_DIR = Path(__file__).parent / "data"
SHIPPED = {
    "train": DATA_DIR / "truthy_mini_train.jsonl",
    "test": DATA_DIR / "truthy_mini_test.jsonl",
    "conversations": DATA_DIR / "conversations_mini.jsonl",
    # The task world (dpo_minimal.course.task; data card in data/README.md).
    "task_train": DATA_DIR / "task_prefs_train.jsonl",
    "task_test": DATA_DIR / "task_prefs_test.jsonl",
    "task_heldout": DATA_DIR / "task_heldout.jsonl",
    "task_sft": DATA_DIR / "task_sft.jsonl",
}
COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")  # TRL's unpaired preference format (KTO)


class OverlongPromptError(ValueError):
    """A prompt alone fills max_length, so its pair has no response tokens left to train."""


def shipped_data_path(split: str = "train") -> Path:
    """Path of a data file shipped with the package.

    'train', 'test' (truthy-mini pairs), 'conversations' (chat-format pairs), 'task_train',
    'task_test' (task-world pairs), 'task_heldout' (task-world prompts only) and 'task_sft' (the
    task world's SFT corpus, prompt and completion).
    """
    if split not in SHIPPED:
        raise ValueError(f"unknown shipped split {split!r}: use one of {', '.join(SHIPPED)}.")
    return SHIPPED[split]


# A string with one of these file suffixes, or that starts like a path, is a local file: it is
# never sent to the Hub, where a typo (data/train.josnl) would come back as a network error.
_PATH_START = ("/", "./", "../", "~", ".\\")


def _looks_local(source: str) -> bool:
    suffix = Path(source).suffix
    return (source.startswith(_PATH_START) or source.count("/") > 1 or "\\" in source
            or bool(re.fullmatch(r"\.[A-Za-z]{2,8}", suffix)))


def _read_rows(source, split: str) -> list[tuple[str, object]]:
    """(where, row) for each row of the source; `where` names the file and line when there is
    one ("prefs.jsonl:line 3"), else the row ("row 3")."""
    if isinstance(source, Dataset):
        return [(f"row {i}", row) for i, row in enumerate(source.to_list())]
    if isinstance(source, list):
        return [(f"row {i}", row) for i, row in enumerate(source)]
    if not isinstance(source, (str, Path)):
        raise ValueError(f"cannot read preference data from a {type(source).__name__}: pass a "
                         ".jsonl/.json path, a list of dicts, a datasets.Dataset or a Hub name.")
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.exists() or isinstance(source, Path) or _looks_local(str(source)):
        raise FileNotFoundError(f"{source}: no such file (it looks like a local path, so it was "
                                "not looked up on the Hub); check the name and the folder.")
    from datasets import load_dataset  # a Hub name: full mode, needs the network

    rows = load_dataset(str(source), split=split).to_list()
    return [(f"{source} row {i}", row) for i, row in enumerate(rows)]


def _read_file(path: Path) -> list[tuple[str, object]]:
    """A .jsonl or .json file read by `datasets.load_dataset("json")`, each row with its line.

    When Arrow cannot read the file (a broken line, a column whose type changes between rows),
    it is read line by line instead, so that the error, or the row check that follows, names
    the file and the line.
    """
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: use a .jsonl (one JSON object per line) or .json (a list of "
                         "objects) file.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                             f"{err.colno}); fix the file.") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got "
                             f"{type(rows).__name__}; use a list, or one row per line in .jsonl.")
        return [(f"{path.name}: row {i}", row) for i, row in enumerate(rows)]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        from datasets import load_dataset
        from datasets.utils import logging as datasets_logging

        # Its progress bar would show only on the first read (later ones hit the cache): keep
        # it off so that what a notebook prints does not depend on the cache.
        bars = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()
        try:
            dataset = load_dataset("json", data_files=str(path), split="train")
        finally:
            if bars:
                datasets_logging.enable_progress_bar()
        rows = [{k: v for k, v in row.items() if v is not None} for row in dataset.to_list()]
        if len(rows) != len(lines):
            raise ValueError("row count differs from line count")
    except Exception:  # noqa: BLE001 - any failure: the line-by-line reader names the line
        rows = []
        for n, line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name}: line {n}: not valid JSON ({err.msg}); each "
                                 "line must be one JSON object. Fix or delete the line.") from None
    return [(f"{path.name}: line {n}", row) for (n, _), row in zip(lines, rows)]


ROLES = ("system", "user", "assistant")


def _check_message_fields(messages: list, where: str) -> None:
    """Every message is a dict with a known role and a non-empty string content."""
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}, message {k}: every message needs 'role' and 'content' "
                             f"keys, e.g. {{'role': 'user', 'content': '...'}}; got {message!r}.")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}, message {k}: role {role!r} is not one of "
                             f"{', '.join(ROLES)}; rename it (e.g. 'bot' -> 'assistant').")
        if not isinstance(content, str):
            raise ValueError(f"{where}, message {k}: content must be a str, got "
                             f"{type(content).__name__} ({content!r}); fix or drop the row.")
        if not content.strip():
            raise ValueError(f"{where}, message {k}: the content is empty; fix or drop the row.")


def _check_turns(messages: list, where: str, reply: bool) -> None:
    """Turn order (TRL's conversational format): a prompt is an optional system message, then
    user and assistant turns alternating, ending with a user turn; a reply is assistant
    messages only."""
    roles = [m["role"] for m in messages]
    if reply:
        if set(roles) != {"assistant"}:
            raise ValueError(f"{where}: a reply must be assistant messages only, got roles "
                             f"{roles}; move other turns into the prompt.")
        return
    if "system" in roles[1:]:
        raise ValueError(f"{where}: a system message may only come first, got roles {roles}.")
    turns = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * len(turns)
    if not turns or turns != expected[:len(turns)] or turns[-1] != "user":
        raise ValueError(f"{where}: the prompt's turns must alternate user, assistant, ... and "
                         f"end with a user turn (the reply answers it), got roles {roles}.")


def _render(messages: list, tokenizer, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _conversation(prompt: list, replies: dict, where: str, tokenizer) -> dict:
    """Prompt and replies ({column: messages}) as text through the tokenizer's chat template."""
    _check_turns(prompt, f"{where}, column 'prompt'", reply=False)
    out = {"prompt": _render(prompt, tokenizer, True)}
    for column, reply in replies.items():
        _check_turns(reply, f"{where}, column {column!r}", reply=True)
        full = _render(prompt + reply, tokenizer, False)
        if not full.startswith(out["prompt"]):
            raise ValueError(f"{where}: the chat template does not render the prompt as the "
                             "start of prompt + reply, so the reply cannot be cut from it; use a "
                             "template that does (most do).")
        out[column] = full[len(out["prompt"]):]
    return out


def _split_implicit(chosen, rejected, where: str):
    """(prompt, chosen, rejected) from rows whose prompt is the shared start of both."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt_c, prompt_r = chosen[:-1], rejected[:-1]
        if prompt_c != prompt_r:
            raise ValueError(f"{where}: chosen and rejected must share the same prompt (every "
                             "message before the last, system message included), but they "
                             "differ; fix the row or add a 'prompt' column.")
        return prompt_c, chosen[-1:], rejected[-1:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = _common_prefix(chosen, rejected)
        n = chosen.rfind(" ", 0, n + 1) if n < len(chosen) else n  # cut at a word boundary
        n = max(n, 0)
        if n == 0:
            raise ValueError(f"{where}: no 'prompt' column and chosen/rejected share no prompt; "
                             "add a 'prompt' column.")
        return chosen[:n], chosen[n:], rejected[n:]
    raise ValueError(f"{where}: chosen and rejected must both be strings or both lists of "
                     "messages (conversational format).")


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _is_unpaired(row: dict) -> bool:
    """Whether a row is in TRL's unpaired preference format: a completion with a bool label
    (KTO's data), rather than a pair of chosen and rejected responses."""
    return row.get("completion") is not None or row.get("label") is not None


# The columns each format needs, and what to tell a row that lacks one.
_NEEDS = {False: (("chosen", "rejected"), "every row needs 'chosen' and 'rejected' (and "
                  "'prompt', unless it is implicit in both)"),
          True: (("prompt", "completion", "label"), "an unpaired row needs 'prompt', "
                 "'completion' and 'label' (true for a desirable completion, false otherwise)")}


def _normalise(row, where: str, tokenizer=None) -> dict:
    """One row in any TRL format -> plain-text prompt and responses (checked).

    A pair gives prompt, chosen, rejected; an unpaired row prompt, completion, label.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict (JSON object) with prompt/chosen/rejected "
                         f"(or prompt/completion/label), got {type(row).__name__}.")
    unpaired = _is_unpaired(row)
    needed, hint = _NEEDS[unpaired]
    if unpaired and (row.get("chosen") is not None or row.get("rejected") is not None):
        raise ValueError(f"{where}: has both pair columns (chosen/rejected) and unpaired ones "
                         "(completion/label); use one format per row.")
    for column in needed:
        if column not in row:
            raise ValueError(f"{where}: missing column {column!r}; {hint}.")
    if unpaired and not isinstance(row["label"], bool):
        raise ValueError(f"{where}, column 'label': expected true or false (desirable or not), "
                         f"got {row['label']!r} ({type(row['label']).__name__}); write a JSON "
                         "boolean, not 1/0 or a string.")
    prompt = row.get("prompt")
    replies = {column: row[column] for column in needed if column not in ("prompt", "label")}
    for column, value in (("prompt", prompt), *replies.items()):
        if isinstance(value, list):
            _check_message_fields(value, f"{where}, column {column!r}")
    if prompt is None:
        prompt, replies["chosen"], replies["rejected"] = _split_implicit(
            replies["chosen"], replies["rejected"], where)
    kinds = {type(v).__name__ for v in (prompt, *replies.values()) if isinstance(v, (str, list))}
    if kinds == {"list"}:
        if tokenizer is None:
            from .models import course_tokenizer

            tokenizer = course_tokenizer()
        elif getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: the rows are conversations (lists of messages), but the "
                             "tokenizer has no chat template to render them in the model's "
                             "format. Set one (tokenizer.chat_template = '...', the model's own "
                             "if it has one), or use the course's explicitly: tokenizer."
                             "chat_template = dpo_minimal.models.course_tokenizer()."
                             "chat_template.")
        out = _conversation(prompt, replies, where, tokenizer)
    elif len(kinds) == 2:
        raise ValueError(f"{where}: mixes formats, some columns are lists of messages "
                         "(conversational) and some plain strings; use one format per row.")
    else:
        out = {"prompt": prompt, **replies}
    for column, value in out.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}, column {column!r}: expected a string (str) or a list of "
                             f"messages, got {type(value).__name__}; fix or drop the row.")
    for column in replies:
        if not out[column].strip():
            raise ValueError(f"{where}, column {column!r}: the response is empty; a pair needs "
                             "two non-empty responses, an unpaired row one: fix or drop the row.")
    if unpaired:
        return {**out, "label": row["label"]}
    if out["chosen"].strip() == out["rejected"].strip():
        raise ValueError(f"{where}: chosen == rejected, which carries no preference; "
                         "fix or drop the row.")
    return out


def _check_one_format(rows: list) -> None:
    """All rows paired, or all unpaired: a data set that mixes them is refused, naming a row
    of each (dicts only; `_normalise` names any other row)."""
    dicts = [(where, _is_unpaired(row)) for where, row in rows if isinstance(row, dict)]
    first = {unpaired: where for where, unpaired in reversed(dicts)}
    if len(first) == 2:
        raise ValueError(f"the data mixes formats: {first[False]} is a pair (prompt, chosen, "
                         f"rejected) and {first[True]} unpaired (prompt, completion, label). Use "
                         "one: split each pair into two unpaired rows (chosen with label true, "
                         "rejected with label false), or drop the unpaired rows.")


def load_preferences(source, split: str = "train", prompt_template: str | None = None,
                     tokenizer=None) -> Dataset:
    """Load preference pairs as a Dataset with string columns prompt, chosen and rejected, or
    unpaired rows (KTO's data) with prompt, completion (strings) and label (bool).

    Args:
        source: a .jsonl/.json path, a list of dicts, a `datasets.Dataset`, or a Hub name
            (e.g. "jondurbin/truthy-dpo-v0.1"; full mode, needs the network). A string that
            looks like a path is never sent to the Hub.
        split: the split to load for a Hub name.
        prompt_template: optional format string applied to each prompt, with fields {prompt}
            and, if the data has that column, {system}; e.g. "Instruct: {prompt}\nOutput:".
        tokenizer: whose chat template renders conversational rows (`train` and `evaluate`
            pass the model's own); default the course tokenizer's ("User: ..." lines, the
            prompt ending with "Assistant:"). A tokenizer without a chat template, given
            conversational rows, raises ValueError naming the two fixes.

    Accepts TRL's formats: standard (strings), conversational (lists of {"role", "content"}
    messages, checked for roles, turn order and contents) and implicit prompt (no prompt
    column: the shared start of chosen and rejected is the prompt), and the unpaired
    preference format: {"prompt", "completion", "label": true (desirable) or false}, standard
    or conversational (the completion a list of assistant messages). A data set is all pairs or
    all unpaired rows; a mix raises. Other columns (e.g. "system") are kept. Bad rows raise
    ValueError naming the row (file and line for a file), the column and the fix; a missing
    file raises FileNotFoundError.
    """
    rows = _read_rows(source, split)
    if not rows:
        name = f" {source}" if isinstance(source, (str, Path)) else ""
        raise ValueError(f"the preference data set{name} is empty: it needs at least one pair.")
    _check_one_format(rows)
    out = []
    for where, row in rows:
        pair = _normalise(row, where, tokenizer)
        extra = {k: v for k, v in row.items() if k not in COLUMNS + UNPAIRED_COLUMNS}
        if prompt_template is not None:
            try:
                pair["prompt"] = prompt_template.format(prompt=pair["prompt"],
                                                        system=row.get("system"))
            except (KeyError, IndexError) as err:
                raise ValueError(f"prompt_template {prompt_template!r} uses the field {err}, "
                                 "which rows do not have: use {prompt} (and {system}).") from None
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
    prompt_ids, chosen_ids, rejected_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return _truncate(prompt_ids, {"chosen": chosen_ids, "rejected": rejected_ids}, tokenizer,
                     max_length, max_prompt_length)


def _truncate(prompt_ids, responses: dict, tokenizer, max_length: int,
              max_prompt_length: int | None) -> dict:
    """tokenize_pair's truncation rule on already encoded texts: prompt_ids and, for each
    response {name: ids}, name_ids."""
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
    return {"prompt_ids": prompt_ids, **{f"{name}_ids": (ids + [tokenizer.eos_token_id])[:room]
                                          for name, ids in responses.items()}}


def tokenize_preferences(data, tokenizer, max_length: int, max_prompt_length: int | None = None,
                         drop_overlong: bool = False) -> list[dict]:
    """tokenize_pair over a data set (rows with prompt, chosen, rejected), or over unpaired
    rows (prompt, completion, label), which give prompt_ids, completion_ids and label.

    Every text goes to the tokenizer in one batched call (a fast tokenizer then encodes them
    together); the ids are the same as pair by pair. A pair whose prompt alone fills
    `max_length` raises, naming its row; with `drop_overlong=True` such pairs are dropped instead
    and counted in a warning. A data set left empty raises.
    """
    check_pad_token(tokenizer)
    rows = list(data)
    unpaired = bool(rows) and _is_unpaired(rows[0])
    responses = ("completion",) if unpaired else ("chosen", "rejected")
    columns = ("prompt", *responses)
    texts = [row[column] for row in rows for column in columns]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, dropped, k = [], [], len(columns)
    for i in range(len(rows)):
        prompt_ids, *response_ids = ids[k * i: k * i + k]
        try:
            out.append(_truncate(prompt_ids, dict(zip(responses, response_ids)), tokenizer,
                                 max_length, max_prompt_length))
            if unpaired:
                out[-1]["label"] = rows[i]["label"]
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
    return _collate_rows(rows, pad_token_id)


def collate_unpaired(examples: list[dict], pad_token_id: int,
                     max_length: int | None = None) -> dict:
    """Stack B tokenised unpaired examples into a (B, T) batch for KTO, with its mismatched rows.

    Returns input_ids, attention_mask and loss_mask (B, T), as `collate_pairs` pads them; `label`
    (B,) bool, True for a desirable completion; and `kl`, a batch of the same three keys whose
    row i is prompt i followed by completion i-1 (the completions rotated by one, as in TRL:
    x_1 gets y_B). KTO's reference point z0 is the mean policy/reference log-ratio on these
    mismatched pairs (Ethayarajh et al. 2024). A borrowed completion is cut from the
    right to fit `max_length` after its new prompt (None: no cut).
    """
    rows = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
    room = [None if max_length is None else max_length - len(e["prompt_ids"]) for e in examples]
    mismatched = [(prompt, completion[:n]) for (prompt, _), (_, completion), n
                  in zip(rows, rows[-1:] + rows[:-1], room)]
    return {**_collate_rows(rows, pad_token_id), "kl": _collate_rows(mismatched, pad_token_id),
            "label": torch.tensor([e["label"] for e in examples], dtype=torch.bool)}


def _collate_rows(rows: list[tuple[list, list]], pad_token_id: int) -> dict:
    """(prompt ids, response ids) rows -> right-padded input_ids, attention_mask, loss_mask."""
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
