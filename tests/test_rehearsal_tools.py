"""The full-mode rehearsal's tools: the fake Hub cache, the runner, the caps, the GPU check."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fake_hub_cache  # noqa: E402
import gpu_check  # noqa: E402
import rehearse  # noqa: E402

from dpo_minimal.course import rehearsal  # noqa: E402

# Run with the Hub offline and HF_HOME on the fake cache: what the notebooks' full mode calls.
OFFLINE_CHECK = """
import json, torch
from collections import Counter
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name in ("gpt2", "microsoft/phi-2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
    tok, model = AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name)
    text = tok.decode(model.generate(**tok("Is the moon made of", return_tensors="pt"),
                                     max_new_tokens=3, do_sample=False)[0])
    out[name] = {"class": type(model).__name__, "dtype": str(model.dtype), "pad": tok.pad_token,
                 "bos": tok.bos_token, "eos": tok.eos_token, "template": bool(tok.chat_template),
                 "generated": text.startswith("Is the moon made of"),
                 "config": model.config.to_dict(), "lm_head_bias": model.lm_head.bias is not None}
    rope = out[name]["config"].get("rope_parameters") or {}  # transformers 5 moved it there
    out[name]["partial_rotary"] = out[name]["config"].get("partial_rotary_factor",
                                                          rope.get("partial_rotary_factor"))
data = load_dataset("jondurbin/truthy-dpo-v0.1")
out["data"] = {"splits": list(data), "columns": data["train"].column_names,
               "rows": len(data["train"]),
               "system": Counter(data["train"]["system"]).most_common(1)[0][0]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return fake_hub_cache.build(tmp_path_factory.mktemp("fake") / "hub")


def test_fake_hub_resolves_offline_without_patching(hub):
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", OFFLINE_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    gpt2, phi2 = out["gpt2"], out["microsoft/phi-2"]
    smol = out["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert (gpt2["class"], phi2["class"], smol["class"]) == (
        "GPT2LMHeadModel", "PhiForCausalLM", "LlamaForCausalLM")
    for model in (gpt2, phi2):  # as on the Hub: no pad token, bos = eos = <|endoftext|>
        assert model["pad"] is None and model["bos"] == model["eos"] == "<|endoftext|>"
    assert (smol["pad"], smol["eos"], smol["bos"]) == ("<|im_end|>",) * 2 + ("<|im_start|>",)
    assert smol["template"] and not gpt2["template"]
    assert (gpt2["dtype"], phi2["dtype"], smol["dtype"]) == (
        "torch.float32", "torch.float16", "torch.bfloat16")  # each real model's dtype on disk
    assert phi2["partial_rotary"] == 0.4 and phi2["lm_head_bias"]
    assert not phi2["config"]["tie_word_embeddings"]
    assert smol["config"]["num_key_value_heads"] < smol["config"]["num_attention_heads"]
    assert gpt2["config"]["n_positions"] == 1024
    assert all(m["generated"] for m in (gpt2, phi2, smol))
    assert out["data"] == {"splits": ["train"], "rows": fake_hub_cache.N_ROWS,
                           "columns": ["id", "source", "system", "prompt", "chosen", "rejected"],
                           "system": fake_hub_cache.SYSTEMS[0]}


def test_fake_hub_layout_is_huggingface_hubs(hub):
    repo = hub / "hub" / "models--microsoft--phi-2"
    commit = (repo / "refs" / "main").read_text()
    snapshot = repo / "snapshots" / commit
    shards = sorted(p.name for p in snapshot.glob("model-*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for link in snapshot.iterdir():  # relative links into blobs/, named by content hash
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo / "blobs").resolve()
        data = link.read_bytes()
        assert link.resolve().name == fake_hub_cache.blob_name(link.name, data)
    arrow = list((hub / "datasets" / "jondurbin___truthy-dpo-v0.1" / "default").glob(
        "0.0.0/*/truthy-dpo-v0.1-train.arrow"))
    assert len(arrow) == 1


def test_blob_names_match_git_and_lfs():
    assert fake_hub_cache.blob_name("README.md", b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    data = b"weights"
    assert fake_hub_cache.blob_name("model.safetensors", data) == hashlib.sha256(data).hexdigest()


def test_preference_rows_are_deterministic_and_distinct():
    rows = fake_hub_cache.preference_rows()
    assert rows == fake_hub_cache.preference_rows() and len(rows) == fake_hub_cache.N_ROWS
    assert len({(r["system"], r["prompt"]) for r in rows}) == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert Counter(r["system"] for r in rows).most_common(1)[0][0] == fake_hub_cache.SYSTEMS[0]
    assert all(r["chosen"] != r["rejected"] and r["prompt"] for r in rows)


def test_build_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fake hub"):
        fake_hub_cache.build(tmp_path)
    assert (tmp_path / "precious.txt").exists()


@pytest.mark.parametrize("value, expected", [(None, (200, 1016)), ("0", (200, 1016)),
                                             ("1", (rehearsal.STEPS, rehearsal.ROWS))])
def test_rehearsal_caps_only_when_asked(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(rehearsal.VARIABLE, raising=False)
    else:
        monkeypatch.setenv(rehearsal.VARIABLE, value)
    assert (rehearsal.steps(200), rehearsal.rows(1016)) == expected
    assert rehearsal.steps(3) == 3  # never more than asked


def test_rehearsal_rejects_a_bad_value(monkeypatch):
    monkeypatch.setenv(rehearsal.VARIABLE, "yes")
    with pytest.raises(ValueError, match="set it to 1"):
        rehearsal.steps(10)


def test_runner_reports_every_error_cell_and_runs_solutions(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("<details><summary>Solution</summary>\n\n```python\n"
                                      "assert x == 2, 'wrong x'\n```\n</details>"),
        nbformat.v4.new_code_cell("1 / 0"),
        nbformat.v4.new_code_cell("y = x + 1"),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    result = rehearse.run_notebook(path, tmp_path / "out", timeout=60, solutions=True)
    assert path.read_bytes() == before  # the notebook itself is never written
    assert [(e["where"], e["error"].split(":")[0]) for e in result["errors"]] == [
        ("solution 1 (markdown cell 1)", "AssertionError"), ("cell 2", "ZeroDivisionError")]
    assert (tmp_path / "out" / "nb.ipynb").exists()


def test_gpu_check_t4_factor_takes_the_slower_resource():
    factor, why = gpu_check.t4_factor("NVIDIA H100 80GB HBM3")
    assert factor == pytest.approx(max(989 / 65, 3.35 / 0.32)) and "bandwidth" in why
    assert gpu_check.t4_factor("Some Future GPU")[0] != gpu_check.t4_factor("H200")[0]


def test_gpu_check_measures_a_tiny_run_on_cpu():
    row = gpu_check.measure("tiny", "gpt2", "float32", 2, 2, 32, True, 2, "cpu", dry_run=True)
    assert row["status"] == "ok" and row["step (s)"] > 0 and row["planned allocated (GiB)"] > 0
    text = gpu_check.table([row, {**row, "status": "OOM"}], None, float("nan"), {})
    assert text.count("\n") == 4 and "OOM" in text


def test_cuda_rehearsal_leaves_the_gpu_visible_and_the_cpu_one_hides_it(tmp_path):
    cpu = rehearse.rehearsal_env(tmp_path / "hub", tmp_path / "out")
    cuda = rehearse.rehearsal_env(tmp_path / "hub", tmp_path / "out", cuda=True)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and "CUDA_VISIBLE_DEVICES" not in cuda
    assert {k: v for k, v in cpu.items() if k != "CUDA_VISIBLE_DEVICES"} == cuda
    assert cuda["DPO_COURSE_MODE"] == "full" and cuda["DPO_COURSE_REHEARSAL"] == "1"


def _rehearse(*args, **env):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "rehearse.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **env})


def test_cuda_rehearsal_without_a_gpu_says_so_and_its_dry_run_checks_the_wiring(hub, tmp_path):
    notebook = "notebooks/04_lora_dpo_gpt2.ipynb"
    # CUDA hidden, so this holds on a GPU machine too: the real run stops and names the fix
    done = _rehearse("--cuda", notebook, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    dry = _rehearse("--cuda", "--dry-run", "--hub", str(hub), "--out", str(tmp_path / "out"),
                    notebook, CUDA_VISIBLE_DEVICES="")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "04_lora_dpo_gpt2.ipynb" in dry.stdout and "DPO_COURSE_MODE=full" in dry.stdout
    assert "CUDA_VISIBLE_DEVICES" not in dry.stdout and "CUDA visible" in dry.stdout
    assert not (tmp_path / "out").exists()  # nothing executed, nothing written
    missing = _rehearse("--cuda", "--dry-run", "notebooks/no_such.ipynb")
    assert missing.returncode != 0 and "no such notebook" in missing.stderr


def test_gpu_check_runs_the_cuda_rehearsal_first_and_the_bench_in_its_dry_run():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    rehearsal_line = script.index("scripts/rehearse.py --cuda ||")
    assert rehearsal_line < script.index('"$PYTHON" benchmarks/gpu_check.py')
    assert "scripts/rehearse.py --cuda --dry-run" in script
    assert "bench_vs_trl.py --device cuda --dry-run" in script
    assert "gpu_check.sh --dry-run" in (ROOT / "mk" / "rehearse.mk").read_text()


def test_bench_vs_trl_on_cuda_without_a_gpu_names_the_dry_run():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"),
                           "--device", "cuda"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "--dry-run" in done.stderr
