"""Hostile inputs: every bad input is refused up front, with an error that names the problem.

Each case asserts the exception type and the words of its message: what is wrong (the field,
the row, the file and line) and, where there is one, the fix. Training cases also check that
nothing was trained before the refusal. Issue 16, item 4; issue 24 adds the cases where real
users meet the trainer (their chat template, folders, cluster signals, files), each also checking
that nothing on disk was written, overwritten or deleted.
"""

import inspect
import json
import math
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import all_of, refused_before_training, without_timing
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, LlamaConfig

import dpo_minimal.data
from dpo_minimal import (
    add_lora,
    dpo_loss,
    evaluate,
    load_preferences,
    shipped_data_path,
    tiny_model,
    tokenize_preferences,
)
from dpo_minimal.adapters import load_adapter, save_adapter
from dpo_minimal.cli import main
from dpo_minimal.losses import orpo_loss
from dpo_minimal.memory import plan_memory
from dpo_minimal.models import course_tokenizer
from dpo_minimal.train import TrainConfig, train

ROWS = load_preferences(shipped_data_path("train")).select(range(8)).to_list()
ROW = {key: ROWS[0][key] for key in ("prompt", "chosen", "rejected")}
SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "Is the sky green?"}
YES = {"role": "assistant", "content": "Yes, it is green."}
NO = {"role": "assistant", "content": "No, it is usually blue."}


# A run that would train in well under a second, if it were ever allowed to start.
CONFIG = TrainConfig(batch_size=2, max_steps=1, max_length=64, max_prompt_length=32,
                     progress=False)


# --- config: TrainConfig checks every field, its type and its combinations ----------------------

CONFIG_CASES = [
    (dict(max_grad_norm=0), all_of("max_grad_norm", "None", "(?i)no clipping")),
    (dict(max_grad_norm=-1), all_of("max_grad_norm", "None", "(?i)no clipping")),
    (dict(warmup_steps=-5), all_of("warmup_steps", "-5")),
    (dict(eval_batch_size=0), all_of("eval_batch_size", ">= ?1|positive")),
    (dict(batch_size=True), all_of("batch_size", "int", "True")),
    (dict(learning_rate="1e-4"), all_of("learning_rate", "float", "1e-4")),
    (dict(max_steps=2.5), all_of("max_steps", "int", "2.5")),
    (dict(gradient_checkpointing="false"), all_of("gradient_checkpointing", "bool")),
    (dict(max_length=256, max_prompt_length=256), all_of("max_prompt_length", "max_length")),
    (dict(max_length=128, max_prompt_length=300), all_of("max_prompt_length", "max_length")),
    (dict(beta=float("nan")), all_of("beta", "nan")),
    (dict(beta=float("inf")), all_of("beta", "(?i)inf|finite")),
    (dict(beta=0.0), all_of("beta", "> ?0")),
    (dict(label_smoothing=0.5), all_of("label_smoothing", r"0\.5")),
    (dict(label_smoothing=-0.1), all_of("label_smoothing")),
    (dict(loss_type="ipo", label_smoothing=0.1), all_of("label_smoothing", "ipo")),
    (dict(loss_type="Sigmoid"), all_of("'Sigmoid'", "sigmoid")),
    (dict(loss_type="DPO"), all_of("'DPO'", "sigmoid")),
    (dict(learning_rate=float("nan")), all_of("learning_rate", "nan")),
    (dict(gradient_accumulation_steps=0), all_of("gradient_accumulation_steps")),
    (dict(weight_decay=-0.1), all_of("weight_decay")),
    (dict(dtype="fp16"), all_of("dtype", "'fp16'", "float16")),
    (dict(lr_scheduler="cosine_with_restarts"), all_of("lr_scheduler", "cosine_with_restarts")),
    (dict(save_steps=10), all_of("save_steps", "output_dir")),
    (dict(output_dir="runs/x", save_total_limit=0), all_of("save_total_limit")),
    (dict(eval_every=-1), all_of("eval_every")),
    (dict(device="gpu"), all_of("device", "'gpu'")),
]


@pytest.mark.parametrize("kwargs, words", CONFIG_CASES,
                         ids=[",".join(f"{k}={v!r}" for k, v in c[0].items())
                              for c in CONFIG_CASES])
def test_config_refuses(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kwargs)


def test_config_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="'lr'"):  # Python's own error names the keyword
        TrainConfig(lr=1e-4)


def test_overlong_prompt_error_names_a_fix_that_exists():
    long_row = {**ROW, "prompt": "word " * 50}
    with pytest.raises(ValueError, match=all_of("row 1", "max_length", r"drop_overlong=True")):
        tokenize_preferences([ROW, long_row], course_tokenizer(), max_length=20)
    assert TrainConfig(drop_overlong=True).drop_overlong is True  # the fix it names exists
    assert "drop_overlong" in inspect.signature(tokenize_preferences).parameters


# --- data: load_preferences, and the same checks in train() ------------------------------------

DATA_CASES = [
    ("reply_role_user",
     {"prompt": [USER], "chosen": [{"role": "user", "content": "Yes."}], "rejected": [NO]},
     all_of("row 0", "chosen", "assistant")),
    ("content_none",
     {"prompt": [USER], "chosen": [YES], "rejected": [{"role": "assistant", "content": None}]},
     all_of("row 0", "rejected", "content", "(?i)str")),
    ("content_int",
     {"prompt": [{"role": "user", "content": 42}], "chosen": [YES], "rejected": [NO]},
     all_of("row 0", "prompt", "content", "(?i)str")),
    ("content_empty",
     {"prompt": [{"role": "user", "content": "  "}], "chosen": [YES], "rejected": [NO]},
     all_of("row 0", "prompt", "(?i)empty")),
    ("unknown_role",
     {"prompt": [{"role": "bot", "content": "hi"}, USER], "chosen": [YES], "rejected": [NO]},
     all_of("row 0", "'bot'", "role", "user")),
    ("system_not_first",
     {"prompt": [USER, SYSTEM], "chosen": [YES], "rejected": [NO]},
     all_of("row 0", "system", "(?i)first")),
    ("prompt_ends_with_assistant",
     {"prompt": [USER, NO], "chosen": [YES], "rejected": [NO]},
     all_of("row 0", "prompt", "(?i)order|alternat|last|end")),
    ("different_system_in_chosen_and_rejected",
     {"chosen": [SYSTEM, USER, YES], "rejected": [{**SYSTEM, "content": "Lie."}, USER, NO]},
     all_of("row 0", "(?i)system|prompt", "(?i)differ|same|share|match")),
    ("different_user_turn_in_chosen_and_rejected",
     {"chosen": [SYSTEM, USER, YES], "rejected": [SYSTEM, {**USER, "content": "Is it red?"}, NO]},
     all_of("row 0", "(?i)prompt|user", "(?i)differ|same|share|match")),
    ("prompt_messages_chosen_string",
     {"prompt": [USER], "chosen": "Yes, it is green.", "rejected": "No, it is blue."},
     all_of("row 0", "(?i)format|message|list|conversational")),
    ("chosen_equals_rejected_up_to_spaces",
     {"prompt": "q", "chosen": "The same answer.", "rejected": "  The same answer. "},
     all_of("row 0", "chosen == rejected|identical|same")),
    ("non_string_response",
     {"prompt": "q", "chosen": 5, "rejected": "b"}, all_of("row 0", "chosen", "(?i)str")),
    ("missing_column", {"prompt": "q", "chosen": "a"}, all_of("row 0", "rejected", "(?i)missing")),
    ("empty_response", {"prompt": "q", "chosen": "a", "rejected": ""},
     all_of("row 0", "rejected", "(?i)empty")),
]


@pytest.mark.parametrize("row, words", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_row_is_refused(row, words):
    with pytest.raises(ValueError, match=words):
        load_preferences([row])


@pytest.mark.parametrize("rows, words", [
    ([], "(?i)empty"),
    (["a string, not a row"], all_of("row 0", "dict")),
    ([ROW, ["prompt", "chosen", "rejected"]], all_of("row 1", "dict")),
], ids=["empty", "string_row", "list_row"])
def test_bad_data_set_is_refused(rows, words):
    with pytest.raises(ValueError, match=words):
        load_preferences(rows)


def test_unknown_prompt_template_field_is_named():
    with pytest.raises(ValueError, match=all_of("prompt_template", "question", r"\{prompt\}")):
        load_preferences([ROW], prompt_template="Q: {question}\nA:")


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "prefs.jsonl", [json.dumps(ROW), '{"prompt": "q", "chosen": '])
    with pytest.raises(ValueError, match=all_of(r"prefs\.jsonl", r"line 2\b")):
        load_preferences(path)


def test_bad_row_in_file_names_file_and_line(tmp_path):
    same = {**ROW, "rejected": ROW["chosen"]}
    path = _write_lines(tmp_path / "prefs.jsonl", [json.dumps(ROW), "", json.dumps(same)])
    with pytest.raises(ValueError, match=all_of(r"prefs\.jsonl", r"line 3\b",
                                                "chosen == rejected|identical|same")):
        load_preferences(path)


def test_non_object_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "prefs.jsonl", [json.dumps(ROW), "[1, 2, 3]"])
    with pytest.raises(ValueError, match=all_of(r"prefs\.jsonl", r"line 2\b", "(?i)dict|object")):
        load_preferences(path)


def test_broken_json_file_is_named(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[{"prompt": "q", "chosen": "a" "rejected": "b"}]', encoding="utf-8")
    with pytest.raises(ValueError, match=all_of(r"prefs\.json", "(?i)json")):
        load_preferences(path)


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(ROW), encoding="utf-8")
    with pytest.raises(ValueError, match=all_of(r"prefs\.json", "list")):
        load_preferences(path)


def test_empty_file_is_refused(tmp_path):
    path = _write_lines(tmp_path / "prefs.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="(?i)empty"):
        load_preferences(path)


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the Hub fails the test loudly."""
    def hub(*args, **kwargs):
        raise AssertionError(f"sent to the Hub: {args}")
    monkeypatch.setattr("datasets.load_dataset", hub)
    monkeypatch.setattr(dpo_minimal.data, "load_dataset", hub, raising=False)


@pytest.mark.parametrize("source", ["data/train.josnl", "./my_prefs", "data/trian.jsonl"])
def test_missing_local_path_is_never_sent_to_the_hub(source, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    name = re.escape(source.split("/")[-1])
    with pytest.raises((FileNotFoundError, ValueError),
                       match=all_of(name, "(?i)does not exist|no such file|not found")):
        load_preferences(source)


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_without_pad_token(tiny_lora):
    model, _ = tiny_lora()
    tok = course_tokenizer()
    tok.pad_token = None
    with refused_before_training(model, ValueError, all_of("pad", "pad_token = ")):
        train(model, tok, ROWS, CONFIG)


def test_tokenizer_without_eos_token(tiny_lora):
    model, _ = tiny_lora()
    tok = course_tokenizer()
    tok.eos_token = None
    with refused_before_training(model, ValueError, "EOS|eos"):
        train(model, tok, ROWS, CONFIG)


# --- training: train() and evaluate() check everything before any work --------------------------

def test_train_on_raw_rows_with_chosen_equal_rejected(tiny_lora):
    model, tok = tiny_lora()
    rows = [dict(row) for row in ROWS]
    rows[3]["rejected"] = rows[3]["chosen"]
    with refused_before_training(model, ValueError,
                                 all_of("row 3", "chosen == rejected|identical|same")):
        train(model, tok, rows, CONFIG)


@pytest.mark.parametrize("rows, words", [
    ([], "(?i)empty"),
    (["not a row"] * 4, all_of("row 0", "dict")),
    ([{"prompt": "q", "chosen": "a"}] * 4, all_of("row 0", "rejected")),
], ids=["empty", "strings", "missing_column"])
def test_train_on_bad_raw_rows(rows, words, tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, words):
        train(model, tok, rows, CONFIG)


def test_bad_eval_data_isrefused_before_training(tiny_lora):
    model, tok = tiny_lora()
    bad = [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    with refused_before_training(model, ValueError, "chosen == rejected|identical|same"):
        train(model, tok, ROWS, CONFIG, eval_data=bad)


def test_max_length_beyond_the_model_context(tiny_lora):
    model, tok = tiny_lora()
    context = model.config.n_positions  # 512 for tiny_model("gpt2")
    with refused_before_training(model, ValueError,
                                 all_of("max_length", str(2 * context), str(context))):
        train(model, tok, ROWS, replace(CONFIG, max_length=2 * context))


def test_evaluate_checks_max_length_too(tiny_lora):
    model, tok = tiny_lora()
    context = model.config.n_positions
    with pytest.raises(ValueError, match=all_of("max_length", str(context))):
        evaluate(model, tok, ROWS, replace(CONFIG, max_length=2 * context))


def test_model_without_trainable_parameters():
    model, tok = tiny_model("gpt2")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=all_of("(?i)no trainable parameters", "add_lora")):
        train(model, tok, ROWS, CONFIG)


def test_batch_size_larger_than_the_data(tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, all_of("batch_size", "pairs")):
        train(model, tok, ROWS, replace(CONFIG, batch_size=64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_on_a_cpu_machine(tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, all_of("cuda", "(?i)cpu|available")):
        train(model, tok, ROWS, replace(CONFIG, device="cuda"))


def test_float16_on_cpu(tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, all_of("float16", "(?i)cuda|gpu")):
        train(model, tok, ROWS, replace(CONFIG, dtype="float16", device="cpu"))


def test_resume_from_a_missing_checkpoint(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    missing = tmp_path / "checkpoint-7"
    with refused_before_training(model, (FileNotFoundError, ValueError), "checkpoint-7"):
        train(model, tok, ROWS, CONFIG, resume_from=missing)


def test_resume_true_without_output_dir(tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, "output_dir"):
        train(model, tok, ROWS, CONFIG, resume_from=True)


def test_resume_true_with_no_checkpoint_in_output_dir(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    config = replace(CONFIG, output_dir=str(tmp_path), save_steps=1)
    with refused_before_training(model, (FileNotFoundError, ValueError),
                                 all_of("(?i)checkpoint", re.escape(tmp_path.name))):
        train(model, tok, ROWS, config, resume_from=True)


# --- loss: dpo_loss and orpo_loss refuse what would silently give NaN ---------------------------

LOGPS = dict(policy_chosen_logps=torch.tensor([-5.0, -6.0]),
             policy_rejected_logps=torch.tensor([-7.0, -6.5]),
             reference_chosen_logps=torch.tensor([-5.5, -6.0]),
             reference_rejected_logps=torch.tensor([-6.5, -6.0]))

LOSS_CASES = [
    ("nan_logps", dict(policy_chosen_logps=torch.tensor([float("nan"), -6.0])),
     ValueError, all_of("policy_chosen_logps", "(?i)nan|finite")),
    ("inf_logps", dict(reference_rejected_logps=torch.tensor([-6.5, float("inf")])),
     ValueError, all_of("reference_rejected_logps", "(?i)inf|finite")),
    ("beta_nan", dict(beta=float("nan")), ValueError, all_of("beta", "nan")),
    ("beta_inf", dict(beta=float("inf")), ValueError, all_of("beta", "(?i)inf|finite")),
    ("label_smoothing_half", dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    ("loss_type_case", dict(loss_type="IPO"), ValueError, all_of("'IPO'", "ipo")),
    ("integer_tensors", {k: v.long() for k, v in LOGPS.items()}, ValueError, "(?i)float"),
    ("python_lists", {k: v.tolist() for k, v in LOGPS.items()}, (TypeError, ValueError),
     "(?i)tensor"),
    ("empty_batch", {k: v[:0] for k, v in LOGPS.items()}, ValueError, "(?i)empty|B ?>= ?1"),
    ("two_dim", {k: v[None] for k, v in LOGPS.items()}, ValueError, "1-D"),
]


@pytest.mark.parametrize("override, exc, words", [c[1:] for c in LOSS_CASES],
                         ids=[c[0] for c in LOSS_CASES])
def test_dpo_loss_refuses(override, exc, words):
    with pytest.raises(exc, match=words):
        dpo_loss(**{**LOGPS, **override})


def test_orpo_loss_refuses_positive_log_probs():
    # a log-probability is <= 0; a positive one (logits or probabilities passed by mistake)
    # makes ORPO's log(1 - p) NaN
    lengths = torch.tensor([4.0, 4.0])
    with pytest.raises(ValueError, match=all_of("(?i)log-?prob", "<= ?0|positive|negative")):
        orpo_loss(torch.tensor([0.5, -2.0]), torch.tensor([-3.0, -4.0]), lengths, lengths)


# --- adapters: load_adapter refuses one that does not fit, and says why -------------------------

@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory, tiny_lora):
    model, _ = tiny_lora()  # 4 layers, width 128
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "gpt2-4-layers")


def _gpt2(**overrides):
    _, tok = tiny_model("gpt2")
    base = dict(n_embd=128, n_layer=4, n_head=4, n_positions=512, vocab_size=len(tok))
    return GPT2LMHeadModel(GPT2Config(**{**base, **overrides}))


def test_adapter_with_more_layers_than_the_model(gpt2_adapter):
    with pytest.raises(ValueError, match=all_of("(?i)layer", r"\b4\b", r"\b2\b")):
        load_adapter(_gpt2(n_layer=2), gpt2_adapter)


def test_adapter_with_other_shapes(gpt2_adapter):
    with pytest.raises(ValueError, match=all_of("(?i)shape|size|width", "128", "64")):
        load_adapter(_gpt2(n_embd=64), gpt2_adapter)


def test_phi_adapter_into_gpt2(tmp_path):
    phi, _ = tiny_model("phi")
    path = save_adapter(add_lora(phi, r=4), tmp_path / "phi")
    with pytest.raises(ValueError, match=all_of("phi", "gpt2")):
        load_adapter(tiny_model("gpt2")[0], path)


def test_adapter_path_that_does_not_exist(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-adapter"):
        load_adapter(tiny_model("gpt2")[0], tmp_path / "no-such-adapter")


# --- memory planner ----------------------------------------------------------------------------

SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def test_plan_memory_on_llama_plans():
    plan = plan_memory(LlamaConfig(**SMALL_LLAMA), batch_pairs=1, seq_len=64, dtype="bfloat16")
    assert plan["total"] > plan["weights"] > 0


def test_plan_memory_on_unknown_family_recommends_only_real_parameters():
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=256)
    with pytest.raises(ValueError, match="gpt_neox") as err:
        plan_memory(config, batch_pairs=1, seq_len=64, dtype="float16")
    named = set(re.findall(r"\b([a-z_]+)=", str(err.value)))
    assert named, f"the error names no fix: {err.value}"
    assert named <= set(inspect.signature(plan_memory).parameters), named


MEMORY_CASES = [
    (dict(batch_pairs=0), "batch_pairs"),
    (dict(seq_len=64.5), all_of("seq_len", "int")),
    (dict(batch_pairs=True), all_of("batch_pairs", "int")),
    (dict(dtype="fp16"), all_of("dtype", "'fp16'", "float16")),
    (dict(dtype=torch.int8), all_of("dtype", "int8")),
    (dict(lora_r=-1), "lora_r"),
    (dict(response_fraction=1.5), "response_fraction"),
    (dict(attn_implementation="flash"), all_of("attn_implementation", "sdpa")),
    (dict(cuda_context_gib=-1.0), "cuda_context_gib"),
]


@pytest.mark.parametrize("override, words", MEMORY_CASES,
                         ids=[",".join(f"{k}={v!r}" for k, v in c[0].items())
                              for c in MEMORY_CASES])
def test_plan_memory_refuses(override, words):
    kwargs = {**dict(batch_pairs=1, seq_len=64, dtype="float16"), **override}
    with pytest.raises(ValueError, match=words):
        plan_memory(GPT2Config(n_embd=64, n_layer=2, n_head=4), **kwargs)


# === Issue 24: where real users meet it ======================================================
# Each case also checks that nothing on disk was written, overwritten or deleted (`_unchanged`).

CONVERSATIONS = [{"prompt": [USER], "chosen": [NO], "rejected": [YES]}] * 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM_EXIT = re.compile(r"Traceback")


def _tree(root) -> dict:
    """Every folder under `root`, and every file with its size and modification time."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size,
                                                               p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@contextmanager
def _unchanged(*roots):
    """Nothing under `roots` is created, changed or deleted inside the block."""
    before = [(_tree(r), Path(r).exists()) for r in roots]
    yield
    assert [(_tree(r), Path(r).exists()) for r in roots] == before


def _small(tmp_path, **kwargs) -> TrainConfig:
    """CONFIG, training 2 steps for real into tmp_path/run, with a checkpoint after each."""
    return replace(CONFIG, **{"output_dir": str(tmp_path / "run"), "save_steps": 1,
                              "max_steps": 2, "learning_rate": 1e-2, **kwargs})


def _cli(argv, capsys) -> str:
    """Run the command line, expecting exit status 2 and no traceback; its stderr."""
    from dpo_minimal.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and not SYSTEM_EXIT.search(err)
    return err


@pytest.fixture
def prefs(tmp_path) -> str:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


CLI_SMALL = ["--tiny", "gpt2", "--max-length", "64", "--max-prompt-length", "32",
             "--batch-size", "2", "--max-steps", "2", "--lora-r", "2", "--no-progress"]


# --- 1. the model's chat template ---------------------------------------------------------------

def _no_template(tiny_lora):
    model, tok = tiny_lora()
    tok.chat_template = None
    return model, tok


def test_conversations_with_a_tokenizer_without_template_train(tmp_path, tiny_lora):
    model, tok = _no_template(tiny_lora)
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("chat template", "tokenizer.chat_template", "course")):
        train(model, tok, CONVERSATIONS, _small(tmp_path))


def test_conversations_with_a_tokenizer_without_template_evaluate(tiny_lora):
    model, tok = _no_template(tiny_lora)
    with refused_before_training(model, ValueError, all_of("chat template", "chat_template =")):
        evaluate(model, tok, CONVERSATIONS, CONFIG)


def test_conversations_with_a_model_folder_without_template_cli(tmp_path, capsys):
    model, tok = tiny_model("gpt2")
    tok.chat_template = None
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "chat.jsonl").write_text(json.dumps(CONVERSATIONS[0]) + "\n")
    with _unchanged(tmp_path):
        err = _cli(["train", "--model", str(tmp_path / "base"), "--data",
                    str(tmp_path / "chat.jsonl"), "--output-dir", str(tmp_path / "out"),
                    *CLI_SMALL[2:]], capsys)
    assert re.search(all_of("chat template", "chat_template"), err)


def test_the_chat_template_of_the_model_is_the_one_trained(tiny_lora):
    """A ChatML tokenizer: the token ids trained are apply_chat_template's, and the first
    step's log-probs differ from the course template's (they were equal before)."""
    chatml = course_tokenizer()
    chatml.chat_template = CHATML
    raw = [json.loads(line) for line in
           shipped_data_path("conversations").read_text().splitlines()[:4]]
    pairs = tokenize_preferences(load_preferences(raw, tokenizer=chatml), chatml, 512, 256)

    def ids(messages, **kwargs):
        return chatml.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]

    for row, pair in zip(raw, pairs):
        assert pair["prompt_ids"] == ids(row["prompt"], add_generation_prompt=True)
        full = ids(row["prompt"] + row["chosen"]) + [chatml.eos_token_id]
        assert pair["prompt_ids"] + pair["chosen_ids"] == full
    config = replace(CONFIG, max_steps=1, max_length=512, max_prompt_length=256)
    course = train(*tiny_lora(), raw, config)[0]["logps/chosen"]
    model, _ = tiny_lora()
    assert train(model, chatml, raw, config)[0]["logps/chosen"] != course


def test_evaluate_moves_the_model_to_config_device(monkeypatch, tiny_lora):
    model, tok = tiny_lora()
    moved = []
    monkeypatch.setattr(type(model), "to", lambda self, *a, **k: moved.append(a) or self)
    evaluate(model, tok, ROWS[:2], replace(CONFIG, device="cpu"))
    assert moved and str(moved[0][0]) == "cpu"


# --- 2. output folders, checked before any work ------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path, tiny_lora):
    (tmp_path / "run").write_text("my notes")
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(model, ValueError,
                                                       all_of("is a file", "folder")):
        train(model, tok, ROWS, _small(tmp_path))


def test_output_dir_under_a_file(tmp_path, tiny_lora):
    (tmp_path / "notes").write_text("x")
    model, tok = tiny_lora()
    config = replace(CONFIG, output_dir=str(tmp_path / "notes" / "run"), save_steps=1)
    with _unchanged(tmp_path), refused_before_training(model, ValueError,
                                                       all_of("notes", "is a file")):
        train(model, tok, ROWS, config)


def test_output_dir_that_cannot_be_written(tiny_lora):
    model, tok = tiny_lora()
    with refused_before_training(model, ValueError, all_of("cannot be written", "(?i)permission",
                                                           "folder you can write")):
        train(model, tok, ROWS, replace(CONFIG, output_dir="/sys/dpo-minimal-run", save_steps=1))


@pytest.mark.parametrize("name", ["", "   "])
def test_output_dir_with_an_empty_name(name):
    with pytest.raises(ValueError, match=all_of("output_dir", "empty", "runs/dpo")):
        TrainConfig(output_dir=name)


def test_output_dir_expands_the_home_folder(tmp_path, monkeypatch, tiny_lora):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = replace(CONFIG, output_dir="~/runs/dpo", save_steps=2)
    assert config.output_dir == str(tmp_path / "runs" / "dpo")
    train(*tiny_lora(), ROWS, config)
    assert (tmp_path / "runs" / "dpo" / "checkpoint-1" / "trainable.safetensors").is_file()
    assert not Path("~").exists()


def test_output_dir_holding_another_run_is_refused(tmp_path, tiny_lora):
    train(*tiny_lora(), ROWS, _small(tmp_path))
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("already holds another run", "checkpoint-1", "--resume",
                                      "--overwrite", "another output_dir")):
        train(model, tok, ROWS, _small(tmp_path))


@pytest.mark.parametrize("left", ["history.json", "adapter", "run.json"])
def test_output_dir_holding_command_line_outputs_is_refused(tmp_path, left, tiny_lora):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / left).write_text("{}") if "." in left else (tmp_path / "run" / left).mkdir()
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(model, ValueError,
                                                       all_of("another run", left)):
        train(model, tok, ROWS, _small(tmp_path))


def test_overwrite_replaces_the_old_run(tmp_path, tiny_lora):
    train(*tiny_lora(), ROWS, _small(tmp_path, max_steps=3))
    train(*tiny_lora(), ROWS, _small(tmp_path, overwrite_output_dir=True))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1",
                                                                    "checkpoint-2"]


def test_resuming_into_a_folder_holding_another_run_is_refused(tmp_path, monkeypatch,
                                                               interrupt_update, tiny_lora):
    train(*tiny_lora(), ROWS, replace(CONFIG, output_dir=str(tmp_path / "a"), save_steps=1,
                                      max_steps=2))
    other = replace(CONFIG, output_dir=str(tmp_path / "b"), save_steps=1, max_steps=3)
    interrupt_update(2)
    with pytest.raises(KeyboardInterrupt):
        train(*tiny_lora(), ROWS, other)
    monkeypatch.undo()
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("another run's checkpoints", "checkpoint-1", "--overwrite")):
        train(model, tok, ROWS, replace(other, output_dir=str(tmp_path / "a")),
              resume_from=tmp_path / "b" / "checkpoint-1")


def test_pruning_keeps_the_newest_checkpoints_of_the_run(tmp_path, monkeypatch,
                                                         interrupt_update, tiny_lora):
    config = replace(CONFIG, output_dir=str(tmp_path), save_steps=1, max_steps=4,
                     save_total_limit=2)
    interrupt_update(3)
    with pytest.raises(KeyboardInterrupt):
        train(*tiny_lora(), ROWS, config)
    monkeypatch.undo()
    train(*tiny_lora(), ROWS, config, resume_from=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_cli_output_dir_that_is_a_file(tmp_path, prefs, capsys):
    (tmp_path / "out").write_text("keep me")
    with _unchanged(tmp_path):
        err = _cli(["train", *CLI_SMALL, "--data", prefs, "--output-dir",
                    str(tmp_path / "out")], capsys)
    assert re.search(all_of("is a file", "folder"), err)


def test_cli_output_dir_that_cannot_be_written(prefs, capsys):
    err = _cli(["train", *CLI_SMALL, "--data", prefs, "--output-dir", "/sys/dpo-run"], capsys)
    assert re.search(all_of("cannot be written", "write to"), err)


def test_cli_output_dir_holding_another_run(tmp_path, prefs, capsys):
    from dpo_minimal.cli import main

    assert main(["train", *CLI_SMALL, "--data", prefs, "--output-dir", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    with _unchanged(tmp_path):
        err = _cli(["train", *CLI_SMALL, "--data", prefs, "--output-dir", str(tmp_path / "o")],
                   capsys)
    assert re.search(all_of("already holds another run", "--resume", "--overwrite"), err)
    assert main(["train", *CLI_SMALL, "--data", prefs, "--output-dir", str(tmp_path / "o"),
                 "--overwrite"]) == 0


def test_cli_output_dir_with_an_empty_name(prefs, capsys):
    assert re.search(all_of("output_dir", "empty"),
                     _cli(["train", *CLI_SMALL, "--data", prefs, "--output-dir", ""], capsys))


# --- 3. no poisoned state ---------------------------------------------------------------------

def _finite_on_disk(folder) -> list[str]:
    from safetensors.torch import load_file

    return [p.name for p in sorted(Path(folder).glob("checkpoint-*"))
            if all(torch.isfinite(t).all() for t in load_file(p / "trainable.safetensors")
                   .values())]


def test_a_diverging_run_writes_no_poisoned_checkpoint(tmp_path, tiny_lora):
    from dpo_minimal.train import NonFiniteLossError

    config = _small(tmp_path, learning_rate=1e4, max_steps=20, max_grad_norm=None,
                    save_total_limit=1)
    with pytest.raises(NonFiniteLossError, match=all_of("float32 run", "learning_rate", "lower")) \
            as caught:
        train(*tiny_lora(), ROWS, config)
    assert "float16" not in str(caught.value)
    on_disk = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert on_disk and _finite_on_disk(tmp_path / "run") == on_disk  # the newest finite is kept
    model, tok = tiny_lora()
    resumed = train(model, tok, ROWS, replace(config, max_steps=len(
        caught.value.history)), resume_from=True)
    assert all(math.isfinite(row["loss"]) for row in resumed)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_gradient_stops_before_the_update(tmp_path, tiny_lora):
    from dpo_minimal.train import NonFiniteLossError

    model, tok = tiny_lora()
    weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * math.inf)
    words = all_of("gradient norm", "step 0", "finite loss")
    with _unchanged(tmp_path), pytest.raises(NonFiniteLossError, match=words):
        train(model, tok, ROWS, CONFIG)
    assert torch.equal(weight, before)  # no update was applied


def test_weights_poisoned_by_an_update_are_never_saved(tmp_path, at_call, tiny_lora):
    from dpo_minimal.train import NonFiniteLossError

    def poison(run):
        with torch.no_grad():
            run.params[0].fill_(math.inf)

    at_call("update", 3, poison, after=True)
    with pytest.raises(NonFiniteLossError, match=all_of("non-finite by step 3", "checkpoint-2")):
        train(*tiny_lora(), ROWS, _small(tmp_path, max_steps=5))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1",
                                                                    "checkpoint-2"]


@pytest.mark.parametrize("damage", ["no trainer_state", "tmp folder"])
def test_resume_skips_an_incomplete_checkpoint(tmp_path, damage, tiny_lora):
    train(*tiny_lora(), ROWS, _small(tmp_path, max_steps=2))
    run = tmp_path / "run"
    if damage == "no trainer_state":
        (run / "checkpoint-2" / "trainer_state.json").unlink()  # a save cut short
    else:
        shutil.copytree(run / "checkpoint-2", run / "checkpoint-3.tmp")
        shutil.rmtree(run / "checkpoint-2")
    history = train(*tiny_lora(), ROWS, _small(tmp_path, max_steps=2), resume_from=True)
    assert len(history) == 2  # it resumed from checkpoint-1 and trained step 2 again


def test_cli_diverging_run_exits_1_naming_the_learning_rate(tmp_path, prefs, capsys):
    from dpo_minimal.cli import main

    code = main(["train", *CLI_SMALL, "--data", prefs, "--output-dir", str(tmp_path / "o"),
                 "--learning-rate", "1e4", "--max-grad-norm", "none", "--max-steps", "20"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(all_of("learning_rate", "lower"), err)
    assert "Traceback" not in err and "float16" not in err


# --- 4. a resume that knows its run -----------------------------------------------------------

@pytest.fixture
def saved_run(tmp_path, tiny_lora):
    """A LoRA run of 2 steps with a checkpoint after each."""
    config = _small(tmp_path, max_steps=2)
    train(*tiny_lora(), ROWS, config, eval_data=ROWS[:2])
    return config


RESUME_CASES = [  # make(tiny_lora) -> ((model, tokenizer), train data, eval data)
    ("other data, same size", lambda lora: (lora(), ROWS[1:] + ROWS[:1], ROWS[:2]),
     ("training data differs", "same size")),
    ("other data size", lambda lora: (lora(), ROWS[:6], ROWS[:2]), ("training data", "8", "6")),
    ("other eval data", lambda lora: (lora(), ROWS, ROWS[2:4]), ("evaluation data",)),
    ("no eval data", lambda lora: (lora(), ROWS, None), ("evaluation data",)),
    ("other base weights", lambda lora: (lora(seed=1), ROWS, ROWS[:2]), ("base model", "weights")),
    ("other architecture", lambda lora: (lora("phi"), ROWS, ROWS[:2]),
     ("base model", "config", "LoRA")),
    ("other LoRA alpha", lambda lora: (lora(alpha=16), ROWS, ROWS[:2]), ("LoRA", "lora_alpha")),
    ("other LoRA targets", lambda lora: ((add_lora(tiny_model("gpt2")[0], r=4, alpha=8,
                                                   target_modules=["c_attn"]),
                                          course_tokenizer()), ROWS, ROWS[:2]),
     ("LoRA", "target_modules")),
    ("other load dtype", lambda lora: ((add_lora(tiny_model("gpt2")[0].to(torch.bfloat16), r=4,
                                                 alpha=8), course_tokenizer()), ROWS, ROWS[:2]),
     ("load dtype",)),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in RESUME_CASES],
                         ids=[c[0] for c in RESUME_CASES])
def test_resume_refuses_another_run(saved_run, tmp_path, make, words, tiny_lora):
    from dpo_minimal.checkpoint import CheckpointError

    (model, tok), data, eval_data = make(tiny_lora)
    with _unchanged(tmp_path), refused_before_training(
            model, CheckpointError, all_of("checkpoint-2", "another run", *words,
                                           "(?i)resume with")):
        train(model, tok, data, saved_run, eval_data=eval_data, resume_from=True)


@pytest.mark.parametrize("name, damage", [
    ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("state.pt", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    ("history.json", lambda p: p.unlink()),
    ("config.json", lambda p: p.write_text("{broken")),
], ids=["truncated weights", "truncated state", "missing history", "broken config"])
def test_a_damaged_checkpoint_names_itself_and_the_previous_one(saved_run, tmp_path, name,
                                                                damage, tiny_lora):
    from dpo_minimal.checkpoint import CheckpointError

    damage(tmp_path / "run" / "checkpoint-2" / name)
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(
            model, CheckpointError, all_of("checkpoint-2", re.escape(name), "cannot be read",
                                           "checkpoint-1")):
        train(model, tok, ROWS, saved_run, eval_data=ROWS[:2], resume_from=True)


def test_a_broken_trainer_state_named_when_resumed_by_path(saved_run, tmp_path, tiny_lora):
    from dpo_minimal.checkpoint import CheckpointError

    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").unlink()
    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(
            model, CheckpointError, all_of("trainer_state.json", "incomplete", "checkpoint-1")):
        train(model, tok, ROWS, saved_run, eval_data=ROWS[:2],
              resume_from=tmp_path / "run" / "checkpoint-2")


def test_raising_max_steps_continues_the_run(saved_run, tiny_lora):
    history = train(*tiny_lora(), ROWS, replace(saved_run, max_steps=4),
                    eval_data=ROWS[:2], resume_from=True)
    assert [row["step"] for row in history] == [1, 2, 3, 4]


def test_max_steps_below_the_steps_done_is_refused(saved_run, tmp_path, tiny_lora):
    from dpo_minimal.checkpoint import CheckpointError

    model, tok = tiny_lora()
    with _unchanged(tmp_path), refused_before_training(
            model, CheckpointError, all_of("2 steps done", "max_steps=1", "max_steps >= 2")):
        train(model, tok, ROWS, replace(saved_run, max_steps=1),
              eval_data=ROWS[:2], resume_from=True)


def test_cli_resume_with_other_data(tmp_path, prefs, capsys):
    from dpo_minimal.cli import main

    out = str(tmp_path / "o")
    assert main(["train", *CLI_SMALL, "--data", prefs, "--output-dir", out,
                 "--save-steps", "1"]) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in ROWS[::-1]))
    capsys.readouterr()
    with _unchanged(tmp_path):
        err = _cli(["train", *CLI_SMALL, "--data", str(other), "--output-dir", out,
                    "--save-steps", "1", "--resume"], capsys)
    assert re.search(all_of("checkpoint-2", "training data differs"), err)


# --- 5. signals -------------------------------------------------------------------------------

def _ctrl_c(times: int):
    """An action for `at_call`: SIGINT sent to this process `times` times, as Ctrl-C (pressed
    once, or again) or a scheduler would."""
    import os
    import signal

    def send(run) -> None:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)

    return send


@pytest.mark.parametrize("method, signals", [("micro_step", 1), ("update", 1), ("update", 2),
                                             ("save", 1), ("save", 2)],
                         ids=["once in a forward", "once in the update", "twice in the update",
                              "once in a save", "twice in a save"])
def test_a_stop_signal_keeps_a_consistent_checkpoint(tmp_path, monkeypatch, at_call, method,
                                                     signals, tiny_lora):
    import signal

    handler = signal.getsignal(signal.SIGINT)
    at_call(method, 2, _ctrl_c(signals))
    config = _small(tmp_path, max_steps=5, save_steps=2 if method == "save" else 0)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(*tiny_lora(), ROWS, config)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    done = len(caught.value.history)
    assert caught.value.checkpoint.name == f"checkpoint-{done}"
    state = torch.load(caught.value.checkpoint / "state.pt", weights_only=True)
    assert state["steps_done"] == done == state["scheduler"]["last_epoch"]
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {done}
    monkeypatch.undo()
    resumed = train(*tiny_lora(), ROWS, config, resume_from=True)
    whole = train(*tiny_lora(), ROWS, replace(config, output_dir=None, save_steps=0))
    assert without_timing(resumed) == without_timing(whole)


def test_an_interrupt_during_evaluation_resumes_bit_for_bit(tmp_path, monkeypatch, at_call,
                                                            tiny_lora):
    config = _small(tmp_path, max_steps=4, save_steps=0, eval_every=2)
    whole = train(*tiny_lora(), ROWS, replace(config, output_dir=None), eval_data=ROWS)

    def ctrl_c(run):  # once the evaluation after step 2 has run, before it is recorded
        raise KeyboardInterrupt

    at_call("evaluate", 1, ctrl_c, after=True)
    with pytest.raises(KeyboardInterrupt):
        train(*tiny_lora(), ROWS, config, eval_data=ROWS)
    monkeypatch.undo()
    resumed = train(*tiny_lora(), ROWS, config, eval_data=ROWS, resume_from=True)
    assert without_timing(resumed) == without_timing(whole)


@pytest.mark.slow
def test_sigterm_through_the_command_line(tmp_path, prefs):
    import os
    import signal
    import subprocess
    import sys

    args = [sys.executable, "-m", "dpo_minimal", "train", *CLI_SMALL, "--data", prefs,
            "--max-steps", "50", "--logging-steps", "1", "--output-dir", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    for line in run.stdout:
        if line.startswith("step 2/"):
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert re.search(all_of("SIGTERM", "stopping after this step", "--resume"), err)
    assert "Traceback" not in err
    saved = [p.name for p in (tmp_path / "o").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("checkpoint-")


# --- 6. settings that train nothing -----------------------------------------------------------

@pytest.mark.parametrize("alpha", [0, -16])
def test_add_lora_refuses_an_alpha_that_trains_nothing(alpha):
    with pytest.raises(ValueError, match=all_of("alpha", "> 0", "2 \\* r")):
        add_lora(tiny_model("gpt2")[0], r=4, alpha=alpha)


def test_train_refuses_a_peft_adapter_with_alpha_zero(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model("gpt2")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=0, target_modules=["c_attn"],
                                             fan_in_fan_out=True))
    with _unchanged(tmp_path), refused_before_training(model, ValueError,
                                                       all_of("lora_alpha=0", "alpha > 0")):
        train(model, tok, ROWS, _small(tmp_path))


def test_cli_lora_alpha_zero(tmp_path, prefs, capsys):
    with _unchanged(tmp_path):
        err = _cli(["train", *CLI_SMALL, "--data", prefs, "--output-dir", str(tmp_path / "o"),
                    "--lora-alpha", "0"], capsys)
    assert re.search(all_of("alpha", "> 0"), err)


def test_trainable_base_weights_beside_the_adapter(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    next(p for n, p in model.named_parameters() if "wte" in n).requires_grad_(True)
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("base weights require grad", "wte", "adapter disabled",
                                      "modules_to_save")):
        train(model, tok, ROWS, _small(tmp_path))


def test_token_ids_beyond_the_embedding(tmp_path):
    config = GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=1, n_head=2)
    model = add_lora(GPT2LMHeadModel(config), r=2)
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("token id", "300 rows", "resize_token_embeddings")):
        train(model, course_tokenizer(), ROWS, _small(tmp_path))


def test_a_model_on_the_meta_device(tmp_path):
    with torch.device("meta"):
        model = GPT2LMHeadModel(tiny_model("gpt2")[0].config)
    with _unchanged(tmp_path), pytest.raises(ValueError, match=all_of("meta device", "load")):
        train(add_lora(model, r=2), course_tokenizer(), ROWS, _small(tmp_path))
    with pytest.raises(ValueError, match="meta device"):
        evaluate(model, course_tokenizer(), ROWS, CONFIG)


# --- 7. files: data and --config files as users write them --------------------------------------
# A key given twice, bytes that are not UTF-8, a folder where a file is due, a column whose type
# changes between rows, a YAML float without a dot, pairs that become identical once cut.

TOK = course_tokenizer()
FILE_ROW = {"prompt": "Is the sky green?", "chosen": " No, it is usually blue.",
            "rejected": " Yes, it is green."}
FILE_SMALL = ["--tiny", "gpt2", "--max-length", "64", "--max-prompt-length", "32", "--batch-size",
              "2", "--max-steps", "1", "--no-progress"]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _rows(n: int = 4) -> list[dict]:
    return [{**FILE_ROW, "rejected": f" Yes, it is green {i}."} for i in range(n)]


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pair(i: int) -> str:
    return json.dumps(_rows(i + 1)[i])


# --- load_preferences: each hostile file is refused, naming the file, the line and the fix -------

LATIN1 = '{"prompt": "Caf\xe9?", "chosen": " Yes.", "rejected": " No."}'.encode("latin-1")


def _duplicate_jsonl(tmp_path):
    return _lines(tmp_path / "file_prefs.jsonl", [
        _pair(0), '{"prompt": "q", "chosen": " a", "rejected": " b", "chosen": " c"}'])


def _duplicate_in_message(tmp_path):
    message = '{"role": "user", "content": "hi", "content": "hello"}'
    return _lines(tmp_path / "chat.jsonl", [
        f'{{"prompt": [{message}], "chosen": [{{"role": "assistant", "content": "a"}}], '
        '"rejected": [{"role": "assistant", "content": "b"}]}'])


def _duplicate_json(tmp_path):
    path = tmp_path / "file_prefs.json"
    path.write_text('[\n  {"prompt": "q", "chosen": " a", "rejected": " b"},\n  {"prompt": "q",\n'
                    '   "chosen": " a", "rejected": " b", "rejected": " c"}\n]\n',
                    encoding="utf-8")
    return path


def _latin1_jsonl(tmp_path):
    path = tmp_path / "file_prefs.jsonl"
    path.write_bytes(_pair(0).encode() + b"\n" + LATIN1 + b"\n")
    return path


def _latin1_json(tmp_path):
    path = tmp_path / "file_prefs.json"
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
    return _lines(tmp_path / "file_prefs.jsonl", [
        json.dumps({**FILE_ROW, "score": 1}), json.dumps({**_rows(2)[1], "score": "high"})])


def _list_then_string(tmp_path):
    return _lines(tmp_path / "file_prefs.jsonl", [
        json.dumps({**FILE_ROW, "tags": ["x"]}), "", json.dumps({**_rows(2)[1], "tags": "x"})])


def _nested_types_differ(tmp_path):
    return _lines(tmp_path / "file_prefs.jsonl", [
        json.dumps({**FILE_ROW, "meta": [1, 2]}), json.dumps({**_rows(2)[1], "meta": ["a"]})])


FILE_CASES = [
    (_duplicate_jsonl, ValueError,
     all_of(r"file_prefs\.jsonl", r"line 2\b", "'chosen'", "twice", "(?i)delete or rename")),
    (_duplicate_in_message, ValueError,
     all_of(r"chat\.jsonl", r"line 1\b", "'content'", "twice", "(?i)delete or rename")),
    (_duplicate_json, ValueError,
     all_of(r"file_prefs\.json\b", r"row 1\b", r"line 3\b", "'rejected'", "twice",
            "(?i)delete or rename")),
    (_latin1_jsonl, ValueError,
     all_of(r"file_prefs\.jsonl", r"line 2\b", "0xe9", "not UTF-8", "(?i)save the file as UTF-8")),
    (_latin1_json, ValueError,
     all_of(r"file_prefs\.json\b", r"line 2\b", "0xe9", "not UTF-8", "(?i)save the file as UTF-8")),
    (_folder_with_file, IsADirectoryError,
     all_of("(?i)is a directory", r"data/train\.jsonl", "(?i)pass the .jsonl")),
    (_empty_folder, IsADirectoryError, all_of("data", "(?i)is a directory", r"(?i)\.jsonl")),
    (_mixed_column, ValueError,
     all_of("'score'", r"line 1\b", r"line 2\b", "number", "string", "(?i)one type",
            "(?i)on every row")),
    (_list_then_string, ValueError,
     all_of("'tags'", r"line 1\b", r"line 3\b", "list", "string", "(?i)on every row")),
    (_nested_types_differ, ValueError, all_of("'meta'", "(?i)types", "(?i)one type on every row")),
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
    path = tmp_path / f"file_prefs{suffix}"
    rows = _rows(3)
    text = json.dumps(rows) if suffix.lower() == ".json" else "\n".join(map(json.dumps, rows))
    path.write_text(text, encoding="utf-8")
    assert load_preferences(path).to_list() == rows


def test_int_float_and_missing_values_share_a_column(tmp_path):
    rows = [{**row, "score": score} for row, score in zip(_rows(3), (1, 2.5, None))]
    rows.append(_rows(4)[3])  # no score at all
    path = _lines(tmp_path / "file_prefs.jsonl", [json.dumps(row) for row in rows])
    assert load_preferences(path)["score"] == [1.0, 2.5, None, None]


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    # JSON allows U+2028 unescaped in a string; only "\n" ends a line of a .jsonl file.
    row = {**FILE_ROW, "prompt": "Is the sky\u2028green?"}
    path = _lines(tmp_path / "file_prefs.jsonl", [json.dumps(row, ensure_ascii=False), _pair(1)])
    assert load_preferences(path)[0]["prompt"] == row["prompt"]


# --- tokenize_preferences: pairs that become identical once cut ---------------------------------

LONG = " The same long opening words, which fill every token of the room left. "


def _cut_alike(i: int) -> dict:
    """A pair whose responses differ only after their first 20 or so tokens."""
    return {"prompt": "Q?", "chosen": LONG + f"Yes {i}.", "rejected": LONG + f"No {i}."}


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    rows = [FILE_ROW, _cut_alike(0), _cut_alike(1)]
    with pytest.warns(UserWarning, match=all_of("dropped 2 of 3 pairs", "identical", r"\[1, 2\]",
                                                "max_length=12", "(?i)raise max_length")):
        out = tokenize_preferences(rows, TOK, max_length=12)
    assert len(out) == 1 and out[0]["chosen_ids"] != out[0]["rejected_ids"]
    assert len(tokenize_preferences(rows, TOK, max_length=64)) == 3  # room enough: all kept


def test_no_pair_left_after_truncation_names_the_cause():
    with pytest.raises(ValueError, match=all_of("no pairs left", "identical", "max_length")), \
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
def file_prefs(tmp_path) -> Path:
    return _lines(tmp_path / "file_prefs.jsonl", [json.dumps(row) for row in _rows(4)])


def _refused(argv: list, tmp_path: Path, capsys, *words: str) -> None:
    out = tmp_path / "run"
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["train", *FILE_SMALL, "--output-dir", str(out), *map(str, argv)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage: dpo-minimal train" in err, err
    assert re.search(all_of(*words), err), err
    assert not out.exists() and _listing(tmp_path) == before


def test_cli_data_folder(tmp_path, capsys):
    folder = _folder_with_file(tmp_path)
    _refused(["--data", folder], tmp_path, capsys, "(?i)is a directory", r"train\.jsonl")


def test_cli_data_with_a_duplicate_key(tmp_path, capsys):
    path = _duplicate_jsonl(tmp_path)
    _refused(["--data", path], tmp_path, capsys, r"file_prefs\.jsonl", r"line 2\b", "'chosen'",
             "twice")


def test_cli_data_not_utf8(tmp_path, capsys):
    path = _latin1_jsonl(tmp_path)
    _refused(["--data", path], tmp_path, capsys, r"file_prefs\.jsonl", r"line 2\b", "not UTF-8",
             "(?i)save the file as UTF-8")


def test_cli_data_column_that_changes_type(tmp_path, capsys):
    path = _mixed_column(tmp_path)
    _refused(["--data", path], tmp_path, capsys, "'score'", r"line 1\b", r"line 2\b",
             "(?i)one type")


def test_cli_config_folder(file_prefs, tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    _refused(["--data", file_prefs, "--config", tmp_path / "configs"], tmp_path, capsys,
             "--config", "configs", "(?i)is a directory", "(?i)pass the YAML or JSON file")


def test_cli_config_not_utf8(file_prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_bytes("beta: 0.2\n# r\xe9glages\n".encode("latin-1"))
    _refused(["--data", file_prefs, "--config", config], tmp_path, capsys, r"options\.yaml",
             r"line 2\b", "not UTF-8", "(?i)save the file as UTF-8")


@pytest.mark.parametrize("line, words", [
    ("learning_rate: fast", ("learning_rate", "float", "'fast'")),
    ("max_steps: ten", ("max_steps", "int", "'ten'")),
    ("beta: [0.1]", ("beta", "float", r"\[0\.1\]")),
])
def test_cli_config_wrong_type_names_the_file_and_option(line, words, file_prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text(line + "\n", encoding="utf-8")
    _refused(["--data", file_prefs, "--config", config], tmp_path, capsys, r"options\.yaml", *words)


def test_cli_yaml_float_without_a_dot_trains(file_prefs, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("learning_rate: 1e-4\nmax_grad_norm: 2E+0\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", *FILE_SMALL, "--data", str(file_prefs), "--config", str(config),
                 "--output-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["learning_rate"], run["max_grad_norm"]) == (1e-4, 2.0)
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_cli_bad_data_is_found_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    with _unchanged(tmp_path):  # the model folder does not exist: the data error comes first
        err = _cli(["train", "--model", str(tmp_path / "no-model"), "--data",
                    str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "o")], capsys)
    assert re.search(all_of("bad.jsonl", "line 1", "rejected"), err)


@pytest.mark.parametrize("where", ["folder", "missing folder"])
def test_cli_eval_output_that_cannot_be_written(tmp_path, prefs, capsys, where):
    target = tmp_path if where == "folder" else tmp_path / "nowhere" / "m.json"
    with _unchanged(tmp_path):
        err = _cli(["eval", "--tiny", "gpt2", "--adapter", str(tmp_path / "a"), "--data", prefs,
                    "--output", str(target)], capsys)
    assert re.search(all_of("--output", "is a directory|does not exist"), err)


def test_output_dir_as_a_path_object(tmp_path, tiny_lora):
    config = replace(CONFIG, output_dir=tmp_path / "run", save_steps=1)
    assert config.output_dir == str(tmp_path / "run")
    train(*tiny_lora(), ROWS, config)
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


def test_a_chat_template_that_refuses_the_messages(tmp_path, tiny_lora):
    model, tok = tiny_lora()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System "
                         "role not supported') }}{% endif %}" + CHATML)
    rows = [{"prompt": [SYSTEM, USER], "chosen": [NO], "rejected": [YES]}] * 4
    with _unchanged(tmp_path), refused_before_training(
            model, ValueError, all_of("row 0", "chat template refused", "System role not "
                                      "supported", "fix the row")):
        train(model, tok, rows, _small(tmp_path))


def test_cli_eval_output_in_a_folder_that_cannot_be_written(prefs, tmp_path, capsys):
    err = _cli(["eval", "--tiny", "gpt2", "--adapter", str(tmp_path / "a"), "--data", prefs,
                "--output", "/sys/metrics.json"], capsys)
    assert re.search(all_of("--output", "cannot be written", "another file"), err)
