"""The command line: train writes what it promises, bad input exits 2 with a clear message,
plan runs offline, and --help is complete (one flag per TrainConfig field)."""

import json
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import PhiConfig

from dpo_minimal import load_preferences, shipped_data_path, tiny_model
from dpo_minimal.adapters import load_adapter
from dpo_minimal.cli import build_parser, main
from dpo_minimal.memory import plan_memory
from dpo_minimal.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max-length", "64", "--max-prompt-length", "32", "--batch-size", "2",
         "--no-progress"]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    rows = load_preferences(shipped_data_path("train")).select(range(6)).to_list()
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(prefs, tmp_path_factory):
    """A run whose --config file sets beta, lora_r and max_steps; the flag overrides max_steps."""
    out = tmp_path_factory.mktemp("run")
    config = out.parent / "options.yaml"
    config.write_text("beta: 0.2\nlora-r: 4\nmax_steps: 7\n")
    code = main(["train", "--config", str(config), "--tiny", "gpt2", "--data", prefs,
                 "--output-dir", str(out), "--max-steps", "2", "--logging-steps", "1", *SMALL])
    assert code == 0
    return out


def test_train_writes_adapter_history_plot_and_settings(trained, capsys):
    history = json.loads((trained / "history.json").read_text())
    assert len(history) == 2  # the flag beat the file's max_steps
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: ln 2
    assert (trained / "metrics.png").stat().st_size > 10_000
    run = json.loads((trained / "run.json").read_text())
    assert (run["beta"], run["lora_r"], run["max_steps"]) == (0.2, 4, 2)
    model = load_adapter(tiny_model("gpt2")[0], trained / "adapter")
    assert model.peft_config["default"].r == 4


def test_train_prints_a_metrics_line_per_logging_step(prefs, tmp_path, capsys):
    assert main(["train", "--tiny", "phi", "--data", prefs, "--output-dir", str(tmp_path),
                 "--max-steps", "2", "--logging-steps", "1", "--lora-r", "2", *SMALL]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[:4] for line in lines] == [["step", "1/2", "loss", "0.6931"],
                                                    ["step", "2/2", "loss", lines[1].split()[3]]]


def test_train_counts_unpaired_rows_as_examples(tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}.", "label": i % 2 == 0}
            for i in range(8)]
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["train", "--tiny", "gpt2", "--data", str(data), "--loss-type", "kto",
                 "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--lora-r", "2",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "; 8 examples;" in out and "pairs" not in out.split("global batch")[1].split("\n")[0]


def test_eval_reads_the_trained_adapter(trained, prefs, capsys):
    assert main(["eval", "--tiny", "gpt2", "--adapter", str(trained / "adapter"), "--data", prefs,
                 "--max-length", "64", "--max-prompt-length", "32", "--beta", "0.2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"loss", "rewards/accuracies", "rewards/margins", "entropy"}
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "beta must be a finite number > 0"),
    (["--learning-rate", "fast"], "invalid float value: 'fast'"),
    (["--loss-type", "dpo"], "invalid choice: 'dpo'"),
    (["--max-grad-norm", "0"], "max_grad_norm must be > 0"),
    (["--max-prompt-length", "64"], "must be below max_length"),
    (["--warp-speed"], "unrecognized arguments: --warp-speed"),
    (["--model", "gpt2"], "exactly one of --model"),
    (["--lora-targets", "no_such_module"], "no_such_module"),
    (["--fsdp"], "add --full"),
    (["--resume"], "holds no checkpoint"),
])
def test_bad_flags_exit_2_with_a_clear_message(prefs, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--tiny", "gpt2", "--data", prefs, "--output-dir", str(tmp_path),
              *SMALL, *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: dpo-minimal train" in err and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--data", "{prefs}", "--config", "{bad}"], "unknown option(s) betta"),
    (["--data", "{prefs}"], "--output-dir is required"),
])
def test_bad_files_and_missing_options_exit_2(prefs, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"betta": 0.1}))
    args = [a.format(prefs=prefs, bad=bad) for a in args]
    out = ["--output-dir", str(tmp_path)] if "output-dir" not in message else []
    with pytest.raises(SystemExit) as exited:
        main(["train", "--tiny", "gpt2", *args, *out])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_trainconfig_field_with_its_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
        help_ = field.metadata.get("help")
        assert help_, f"TrainConfig.{field.name} has no help"
        assert " ".join(help_.split()) in text
    for flag in ("--config", "--model", "--tiny", "--data", "--eval-data", "--output-dir",
                 "--resume", "--resume-from", "--lora-r", "--lora-alpha", "--lora-dropout",
                 "--lora-targets", "--full"):
        assert flag in text


def test_plan_runs_offline_on_a_local_config(tmp_path, capsys):
    phi2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                     num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                     tie_word_embeddings=False, max_position_embeddings=2048)
    phi2.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    expected = plan_memory(phi2, batch_pairs=2, seq_len=512, dtype=torch.float16, lora_r=16,
                           gradient_checkpointing=True)
    assert plan == pytest.approx(expected)
    assert main(["plan", str(tmp_path), "--full", "--fsdp", "--processes", "4",
                 "--dtype", "bfloat16", "--json"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    full = plan_memory(phi2, batch_pairs=2, seq_len=512, dtype="bfloat16", lora_r=0)
    assert sharded["optimizer_state"] == pytest.approx(full["optimizer_state"] / 4)
    assert sharded["total"] < full["total"] / 2


def test_plan_says_clearly_when_a_hub_config_is_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(SystemExit) as exited:
        main(["plan", "nobody-here/no-such-model"])
    assert exited.value.code == 2
    assert "not in this machine's Hugging Face cache" in capsys.readouterr().err


def test_python_m_dpo_minimal_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "dpo_minimal", "plan", "--tiny", "llama"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout


def test_trl_flag_names_train(prefs, tmp_path):
    """TRL's (and transformers') names for the same settings are accepted."""
    assert main(["train", "--tiny", "gpt2", "--data", prefs, "--output_dir", str(tmp_path),
                 "--learning_rate", "1e-4", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--max_steps", "1", "--beta", "0.2",
                 "--loss_type", "sigmoid", "--logging_steps", "1", "--save_steps", "1",
                 "--max-length", "64", "--max-prompt-length", "32", "--no-progress"]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["learning_rate"], run["batch_size"], run["max_steps"]) == (1e-4, 2, 1)
    assert (tmp_path / "checkpoint-1").is_dir()


def test_num_train_epochs_sets_the_steps(prefs, tmp_path):
    assert main(["train", "--tiny", "gpt2", "--data", prefs, "--output-dir", str(tmp_path),
                 "--num_train_epochs", "1.5", *SMALL]) == 0  # 6 pairs, batch 2: 4.5 -> 5
    assert len(json.loads((tmp_path / "history.json").read_text())) == 5


@pytest.mark.parametrize("given", [["--max_steps=2"], ["--max-steps", "2"], ["--config", "{f}"]])
def test_max_steps_given_wins_over_num_train_epochs(prefs, tmp_path, given):
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"max_steps": 2}))
    given = [arg.format(f=options) for arg in given]
    assert main(["train", "--tiny", "gpt2", "--data", prefs, "--output-dir", str(tmp_path / "o"),
                 "--num_train_epochs", "3", *given, *SMALL]) == 0
    assert len(json.loads((tmp_path / "o" / "history.json").read_text())) == 2


@pytest.mark.parametrize("values, message", [({"tiny": "bert"}, "tiny 'bert': use one of"),
                                             ({"load_dtype": "int8"}, "load_dtype 'int8'")])
def test_config_file_values_are_checked_like_flags(prefs, tmp_path, capsys, values, message):
    options = tmp_path / "options.json"
    options.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", str(options), "--data", prefs, "--output-dir",
              str(tmp_path / "o"), *([] if "tiny" in values else ["--tiny", "gpt2"])])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_parser_leaves_trainconfig_types_alone():
    """HfArgumentParser rewrites the types of the fields it is given: it gets a copy."""
    before = {f.name: f.type for f in fields(TrainConfig)}
    build_parser()
    assert {f.name: f.type for f in fields(TrainConfig)} == before
    assert before["max_grad_norm"] == float | None


def test_pretrained_tiny_model_from_the_command_line(tmp_path, capsys):
    task = str(shipped_data_path("task_train"))  # the task world it was trained on
    logps = {}
    for name, extra in (("pretrained", ["--pretrained"]), ("random", [])):
        assert main(["train", "--tiny", "gpt2", *extra, "--data", task, "--output-dir",
                     str(tmp_path / name), *SMALL, "--max-steps", "1"]) == 0
        logps[name] = json.loads((tmp_path / name / "history.json").read_text())[0][
            "logps/chosen"]
    assert logps["pretrained"] > logps["random"] + 10  # it finds the task's answers likelier
    with pytest.raises(SystemExit):
        main(["train", "--tiny", "llama", "--pretrained", "--data", task, "--output-dir",
              str(tmp_path / "llama")])
    assert "no pretrained tiny llama ships; use --tiny gpt2 or phi" in capsys.readouterr().err


def test_logging_window_evaluation_schedule_and_summary(prefs, tmp_path, capsys):
    assert main(["train", "--tiny", "gpt2", "--data", prefs, "--eval-data", prefs,
                 "--output-dir", str(tmp_path), "--max-steps", "10", "--eval-every", "5",
                 "--logging-steps", "5", *SMALL]) == 0
    out = capsys.readouterr().out
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["step"] for row in history if "eval/loss" in row] == [5, 10]
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]
    logged = float(lines[1].split("loss ")[1].split()[0])
    window = sum(row["loss"] for row in history[5:]) / 5  # the mean of steps 6..10
    assert logged == pytest.approx(window, abs=1e-4)
    assert "done, 10 steps" in out and "held out at the end" in out and "wrote" in out


def test_plan_takes_any_family_from_a_folder_or_a_config_json(tmp_path, capsys):
    """A tiny Qwen2 saved to a folder and a Mistral config.json: planned offline, their blocks
    read off the model (SwiGLU, RMSNorm), LoRA on peft's default targets."""
    from transformers import MistralConfig, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(Qwen2Config(**sizes)).save_pretrained(tmp_path / "qwen2")
    MistralConfig(**sizes).save_pretrained(tmp_path / "mistral")
    plans = {}
    for argv in (["plan", str(tmp_path / "qwen2")],
                 ["plan", "--config-json", str(tmp_path / "mistral" / "config.json")],
                 ["plan", str(tmp_path / "qwen2"), "--arch", "llama"]):
        assert main([*argv, "--json", "--batch-pairs", "2", "--seq-len", "128"]) == 0
        plans[argv[-1]] = json.loads(capsys.readouterr().out)
    qwen2, mistral, as_llama = plans.values()
    assert qwen2["total"] > 0 and qwen2["activations"] > 0
    assert qwen2["weights"] == pytest.approx(mistral["weights"], rel=0.05)  # same sizes
    assert as_llama["lora_parameters"] > qwen2["lora_parameters"]  # Llama's 7 targets, not 2
