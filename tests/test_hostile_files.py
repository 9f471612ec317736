"""Hostile files: data and --config files as real users write them (issue 24, group 7).

A key given twice, bytes that are not UTF-8, a folder where a file is due, a column whose type
changes between rows, a YAML float without a dot, pairs that become identical once cut. Each
refusal is checked for its type (or exit status 2), the words that name the problem and the
fix, and that nothing was written. To be folded into tests/test_hostile.py.
"""

import json
import re
import warnings
from pathlib import Path

import pytest

from dpo_minimal import load_preferences, tokenize_preferences
from dpo_minimal.cli import main
from dpo_minimal.models import course_tokenizer

TOK = course_tokenizer()
ROW = {"prompt": "Is the sky green?", "chosen": " No, it is usually blue.",
       "rejected": " Yes, it is green."}
SMALL = ["--tiny", "gpt2", "--max-length", "64", "--max-prompt-length", "32", "--batch-size",
         "2", "--max-steps", "1", "--no-progress"]


def _all(*patterns: str) -> str:
    """A regex that matches a message containing every pattern, in any order.

    A pattern may start with "(?i)": that one alone is matched ignoring case.
    """
    scoped = [f"(?i:{p[4:]})" if p.startswith("(?i)") else f"(?:{p})" for p in patterns]
    return "(?s)^" + "".join(f"(?=.*{p})" for p in scoped)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _rows(n: int = 4) -> list[dict]:
    return [{**ROW, "rejected": f" Yes, it is green {i}."} for i in range(n)]


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pair(i: int) -> str:
    return json.dumps(_rows(i + 1)[i])


# --- load_preferences: each hostile file is refused, naming the file, the line and the fix -------

LATIN1 = '{"prompt": "Caf\xe9?", "chosen": " Yes.", "rejected": " No."}'.encode("latin-1")


def _duplicate_jsonl(tmp_path):
    return _lines(tmp_path / "prefs.jsonl", [
        _pair(0), '{"prompt": "q", "chosen": " a", "rejected": " b", "chosen": " c"}'])


def _duplicate_in_message(tmp_path):
    message = '{"role": "user", "content": "hi", "content": "hello"}'
    return _lines(tmp_path / "chat.jsonl", [
        f'{{"prompt": [{message}], "chosen": [{{"role": "assistant", "content": "a"}}], '
        '"rejected": [{"role": "assistant", "content": "b"}]}'])


def _duplicate_json(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[\n  {"prompt": "q", "chosen": " a", "rejected": " b"},\n  {"prompt": "q",\n'
                    '   "chosen": " a", "rejected": " b", "rejected": " c"}\n]\n',
                    encoding="utf-8")
    return path


def _latin1_jsonl(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(_pair(0).encode() + b"\n" + LATIN1 + b"\n")
    return path


def _latin1_json(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_bytes(b"[\n" + LATIN1 + b"\n]\n")
    return path


def _folder_with_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _lines(folder / "train.jsonl", [_pair(0)])
    return folder


def _empty_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def _mixed_column(tmp_path):
    return _lines(tmp_path / "prefs.jsonl", [
        json.dumps({**ROW, "score": 1}), json.dumps({**_rows(2)[1], "score": "high"})])


def _list_then_string(tmp_path):
    return _lines(tmp_path / "prefs.jsonl", [
        json.dumps({**ROW, "tags": ["x"]}), "", json.dumps({**_rows(2)[1], "tags": "x"})])


def _nested_types_differ(tmp_path):
    return _lines(tmp_path / "prefs.jsonl", [
        json.dumps({**ROW, "meta": [1, 2]}), json.dumps({**_rows(2)[1], "meta": ["a"]})])


FILE_CASES = [
    (_duplicate_jsonl, ValueError,
     _all(r"prefs\.jsonl", r"line 2\b", "'chosen'", "twice", "(?i)delete or rename")),
    (_duplicate_in_message, ValueError,
     _all(r"chat\.jsonl", r"line 1\b", "'content'", "twice", "(?i)delete or rename")),
    (_duplicate_json, ValueError,
     _all(r"prefs\.json\b", r"row 1\b", r"line 3\b", "'rejected'", "twice",
          "(?i)delete or rename")),
    (_latin1_jsonl, ValueError,
     _all(r"prefs\.jsonl", r"line 2\b", "0xe9", "not UTF-8", "(?i)save the file as UTF-8")),
    (_latin1_json, ValueError,
     _all(r"prefs\.json\b", r"line 2\b", "0xe9", "not UTF-8", "(?i)save the file as UTF-8")),
    (_folder_with_file, IsADirectoryError,
     _all("(?i)is a directory", r"data/train\.jsonl", "(?i)pass the .jsonl")),
    (_empty_folder, IsADirectoryError, _all("data", "(?i)is a directory", r"(?i)\.jsonl")),
    (_mixed_column, ValueError,
     _all("'score'", r"line 1\b", r"line 2\b", "number", "string", "(?i)one type",
          "(?i)on every row")),
    (_list_then_string, ValueError,
     _all("'tags'", r"line 1\b", r"line 3\b", "list", "string", "(?i)on every row")),
    (_nested_types_differ, ValueError, _all("'meta'", "(?i)types", "(?i)one type on every row")),
]


@pytest.mark.parametrize("make, exc, words", FILE_CASES, ids=[c[0].__name__ for c in FILE_CASES])
def test_hostile_file_is_refused(make, exc, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the folder cases name data/train.jsonl relative to it
    source = make(tmp_path).relative_to(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(exc, match=words):
        load_preferences(source)
    assert _listing(tmp_path) == before  # no cache, no file written


@pytest.mark.parametrize("suffix", [".JSONL", ".Jsonl", ".JSON", ".Json"])
def test_suffix_in_any_case_loads(suffix, tmp_path):
    path = tmp_path / f"prefs{suffix}"
    rows = _rows(3)
    text = json.dumps(rows) if suffix.lower() == ".json" else "\n".join(map(json.dumps, rows))
    path.write_text(text, encoding="utf-8")
    assert load_preferences(path).to_list() == rows


def test_int_float_and_missing_values_share_a_column(tmp_path):
    rows = [{**row, "score": score} for row, score in zip(_rows(3), (1, 2.5, None))]
    rows.append(_rows(4)[3])  # no score at all
    path = _lines(tmp_path / "prefs.jsonl", [json.dumps(row) for row in rows])
    assert load_preferences(path)["score"] == [1.0, 2.5, None, None]


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    # JSON allows U+2028 unescaped in a string; only "\n" ends a line of a .jsonl file.
    row = {**ROW, "prompt": "Is the sky\u2028green?"}
    path = _lines(tmp_path / "prefs.jsonl", [json.dumps(row, ensure_ascii=False), _pair(1)])
    assert load_preferences(path)[0]["prompt"] == row["prompt"]


# --- tokenize_preferences: pairs that become identical once cut ---------------------------------

LONG = " The same long opening words, which fill every token of the room left. "


def _cut_alike(i: int) -> dict:
    """A pair whose responses differ only after their first 20 or so tokens."""
    return {"prompt": "Q?", "chosen": LONG + f"Yes {i}.", "rejected": LONG + f"No {i}."}


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    rows = [ROW, _cut_alike(0), _cut_alike(1)]
    with pytest.warns(UserWarning, match=_all("dropped 2 of 3 pairs", "identical", r"\[1, 2\]",
                                              "max_length=12", "(?i)raise max_length")):
        out = tokenize_preferences(rows, TOK, max_length=12)
    assert len(out) == 1 and out[0]["chosen_ids"] != out[0]["rejected_ids"]
    assert len(tokenize_preferences(rows, TOK, max_length=64)) == 3  # room enough: all kept


def test_no_pair_left_after_truncation_names_the_cause():
    with pytest.raises(ValueError, match=_all("no pairs left", "identical", "max_length")), \
            pytest.warns(UserWarning, match="identical"):
        tokenize_preferences([_cut_alike(0)], TOK, max_length=12)


def test_unpaired_rows_are_never_dropped_as_identical():
    rows = [{"prompt": "Q?", "completion": LONG + end, "label": label}
            for end, label in (("Yes.", True), ("No.", False))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tokenize_preferences(rows, TOK, max_length=12)
    assert [e["label"] for e in out] == [True, False]
    assert out[0]["completion_ids"] == out[1]["completion_ids"]  # cut alike, still kept


# --- the command line: exit status 2, the problem and the fix on stderr, nothing written ---------

@pytest.fixture
def prefs(tmp_path) -> Path:
    return _lines(tmp_path / "prefs.jsonl", [json.dumps(row) for row in _rows(4)])


def _refused(argv: list, tmp_path: Path, capsys, *words: str) -> None:
    out = tmp_path / "run"
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["train", *SMALL, "--output-dir", str(out), *map(str, argv)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage: dpo-minimal train" in err, err
    assert re.search(_all(*words), err), err
    assert not out.exists() and _listing(tmp_path) == before


def test_cli_data_folder(tmp_path, capsys):
    folder = _folder_with_file(tmp_path)
    _refused(["--data", folder], tmp_path, capsys, "(?i)is a directory", r"train\.jsonl")


def test_cli_data_with_a_duplicate_key(tmp_path, capsys):
    path = _duplicate_jsonl(tmp_path)
    _refused(["--data", path], tmp_path, capsys, r"prefs\.jsonl", r"line 2\b", "'chosen'",
             "twice")


def test_cli_data_not_utf8(tmp_path, capsys):
    path = _latin1_jsonl(tmp_path)
    _refused(["--data", path], tmp_path, capsys, r"prefs\.jsonl", r"line 2\b", "not UTF-8",
             "(?i)save the file as UTF-8")


def test_cli_data_column_that_changes_type(tmp_path, capsys):
    path = _mixed_column(tmp_path)
    _refused(["--data", path], tmp_path, capsys, "'score'", r"line 1\b", r"line 2\b",
             "(?i)one type")


def test_cli_config_folder(prefs, tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    _refused(["--data", prefs, "--config", tmp_path / "configs"], tmp_path, capsys,
             "--config", "configs", "(?i)is a directory", "(?i)pass the YAML or JSON file")


def test_cli_config_not_utf8(prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_bytes("beta: 0.2\n# r\xe9glages\n".encode("latin-1"))
    _refused(["--data", prefs, "--config", config], tmp_path, capsys, r"options\.yaml",
             r"line 2\b", "not UTF-8", "(?i)save the file as UTF-8")


@pytest.mark.parametrize("line, words", [
    ("learning_rate: fast", ("learning_rate", "float", "'fast'")),
    ("max_steps: ten", ("max_steps", "int", "'ten'")),
    ("beta: [0.1]", ("beta", "float", r"\[0\.1\]")),
])
def test_cli_config_wrong_type_names_the_file_and_option(line, words, prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text(line + "\n", encoding="utf-8")
    _refused(["--data", prefs, "--config", config], tmp_path, capsys, r"options\.yaml", *words)


def test_cli_yaml_float_without_a_dot_trains(prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("learning_rate: 1e-4\nmax_grad_norm: 2E+0\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--data", str(prefs), "--config", str(config),
                 "--output-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["learning_rate"], run["max_grad_norm"]) == (1e-4, 2.0)
    assert len(json.loads((out / "history.json").read_text())) == 1
