"""Preference data: loading, checking, tokenising and collating (x, y_w, y_l) pairs."""

import json
import re
from pathlib import Path

import pyarrow
from datasets import Dataset

from .batching import (  # noqa: F401 - importable from here, as before
    OverlongPromptError,
    check_pad_token,
    collate_pairs,
    collate_unpaired,
    tokenize_preferences,
)

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
    if path.is_dir():
        raise IsADirectoryError(f"{source} is a directory, not a data file; "
                                f"{_files_inside(path)}")
    if path.exists() or isinstance(source, Path) or _looks_local(str(source)):
        raise FileNotFoundError(f"{source}: no such file (it looks like a local path, so it was "
                                "not looked up on the Hub); check the name and the folder.")
    from datasets import load_dataset  # a Hub name: full mode, needs the network

    rows = load_dataset(str(source), split=split).to_list()
    return [(f"{source} row {i}", row) for i, row in enumerate(rows)]


def _files_inside(folder: Path) -> str:
    """The fix for a folder given as data: pass a file inside it, named when there is one."""
    inside = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in (".jsonl", ".json"))
    if not inside:
        return "pass the .jsonl (or .json) file of preference rows instead."
    return f"pass the .jsonl (or .json) file inside it, e.g. {', '.join(map(str, inside[:3]))}."


class _DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice: json alone would silently keep the last value."""


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a JSON object (a row, or a message inside one) as a dict,
    refusing a key given twice."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _duplicate_key(path: Path, where: str, key: str) -> ValueError:
    return ValueError(f"{path.name}: {where}: the key {key!r} appears twice in one JSON object, "
                      "so one of its values would be silently lost; delete or rename one.")


def _decode(path: Path, data: bytes) -> str:
    """The file's text as UTF-8 (a leading byte-order mark, as some Windows editors write, is
    dropped); bytes that are not UTF-8 raise, naming the line, the column and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise ValueError(f"{path.name}: line {line}, column {column}: byte "
                         f"0x{data[err.start]:02x} is not UTF-8 (the file is in another "
                         "encoding, e.g. Latin-1 or Windows-1252); save the file as UTF-8 (an "
                         "editor's 'save with encoding', or iconv -f latin1 -t utf-8).") from None


def _json_rows_start(text: str) -> list[tuple[int, int]]:
    """(index, line) where each element of a .json list starts; it stops at the first element
    that does not parse. Used only to name the row of a duplicate key."""
    blank, starts = re.compile(r"[ \t\n\r]*"), []
    i = blank.match(text).end()
    if not text.startswith("[", i):
        return starts
    i = blank.match(text, i + 1).end()
    decoder = json.JSONDecoder()
    while i < len(text) and text[i] != "]":
        starts.append((i, text.count("\n", 0, i) + 1))
        try:
            _, i = decoder.raw_decode(text, i)
        except ValueError:
            break
        i = blank.match(text, i).end()
        if text.startswith(",", i):
            i = blank.match(text, i + 1).end()
    return starts


def _read_json(path: Path, text: str) -> list[tuple[str, object]]:
    """A .json file: one list of rows, each named by its index."""
    try:
        rows = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as err:
        decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
        for row, (start, line) in enumerate(_json_rows_start(text)):
            try:
                decoder.raw_decode(text, start)
            except _DuplicateKeyError:
                raise _duplicate_key(path, f"row {row} (from line {line})", err.args[0]) from None
            except ValueError:
                break
        raise _duplicate_key(path, "a row", err.args[0]) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                         f"{err.colno}); fix the file.") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got "
                         f"{type(rows).__name__}; use a list, or one row per line in .jsonl.")
    return [(f"{path.name}: row {i}", row) for i, row in enumerate(rows)]


def _read_file(path: Path) -> list[tuple[str, object]]:
    """A .jsonl (one JSON object per line) or .json (a list of objects) file, each row with
    where it is ("prefs.jsonl: line 3", "prefs.json: row 2"); the suffix in any case (.JSONL).

    Read with Python's json, so that every refusal names the file and the line: a line that is
    not JSON, bytes that are not UTF-8, a key given twice in one object (json alone would keep
    one value silently). As when Arrow read these files, a .jsonl row's null values are
    dropped (a null column is a missing one).
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: use a .jsonl (one JSON object per line) or .json (a list of "
                         "objects) file.")
    text = _decode(path, path.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")
    if suffix == ".json":
        return _read_json(path, text)
    out = []
    # Only "\n" ends a line: str.splitlines would also cut at U+2028 and the like, which JSON
    # allows unescaped inside a string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKeyError as err:
            raise _duplicate_key(path, f"line {n}", err.args[0]) from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name}: line {n}: not valid JSON ({err.msg}); each "
                             "line must be one JSON object. Fix or delete the line.") from None
        if isinstance(row, dict):
            row = {key: value for key, value in row.items() if value is not None}
        out.append((f"{path.name}: line {n}", row))
    return out


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


def _render(messages: list, tokenizer, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja2's and the template's own errors alike
        raise ValueError(f"{where}: the tokenizer's chat template refused these messages "
                         f"({type(err).__name__}: {err}); some templates take no system "
                         "message or need strict user/assistant turns: fix the row, or set "
                         "another tokenizer.chat_template.") from None


def _conversation(prompt: list, replies: dict, where: str, tokenizer) -> dict:
    """Prompt and replies ({column: messages}) as text through the tokenizer's chat template."""
    _check_turns(prompt, f"{where}, column 'prompt'", reply=False)
    out = {"prompt": _render(prompt, tokenizer, True, where)}
    for column, reply in replies.items():
        _check_turns(reply, f"{where}, column {column!r}", reply=True)
        full = _render(prompt + reply, tokenizer, False, where)
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
    all unpaired rows; a mix raises. Other columns (e.g. "system") are kept; one whose type
    changes between rows (a number on one, a string on another) raises. Bad rows raise
    ValueError naming the row (file and line for a file), the column and the fix. Files are read
    with Python's json (`_read_file`): a line that is not JSON, a key given twice in one object
    or bytes that are not UTF-8 raise ValueError naming the file and the line; a missing file
    raises FileNotFoundError and a folder IsADirectoryError.
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
    _check_column_types(rows, out)
    try:
        return Dataset.from_list(out)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as err:  # e.g. nested types that differ
        bad = [c for c in out[0] if not _arrow_stores([row.get(c) for row in out])]
        raise ValueError(f"column {', '.join(map(repr, bad)) or '?'} holds values of different "
                         f"types on different rows, which a Dataset cannot store ({err}); give it "
                         "one type on every row, or drop the column.") from None


def _arrow_stores(values: list) -> bool:
    try:
        pyarrow.array(values)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError):
        return False
    return True


def _kind(value) -> str | None:
    """The JSON kind of a value, as Arrow must store a column: ints and floats are both
    numbers (Arrow widens them), None fits any column."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _check_column_types(rows: list, out: list) -> None:
    """Each kept column holds one kind of value: Arrow cannot store a column that is a number
    on one row and a string on another, and its own error names neither. `out` are the rows to
    store, in the order of `rows` (whose `where` names them)."""
    first: dict[str, tuple[str, str]] = {}  # column: (kind, where) of its first value
    for (where, _), row in zip(rows, out):
        for column, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            if column not in first:
                first[column] = (kind, where)
            elif first[column][0] != kind:
                was, there = first[column]
                raise ValueError(f"column {column!r} changes type between rows: {there} has "
                                 f"a value of type {was}, {where} one of type {kind} "
                                 f"({value!r}); give the column one type on every row (ints and "
                                 "floats may mix), or rename it on one of them.")
