"""Build an offline Hugging Face cache that full mode resolves with no network and no patching.

    python scripts/fake_hub_cache.py                  # -> build/fake-hub
    python scripts/fake_hub_cache.py /tmp/hub          # anywhere (an empty or earlier fake hub)
    export HF_HOME=build/fake-hub HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python -c 'import transformers as t; t.AutoModelForCausalLM.from_pretrained("gpt2")'

Under the real ids it holds tiny, randomly initialised models of the real architectures, and a
preference data set with truthy-dpo's schema, laid out as the libraries lay out their caches:

- hub/models--<org>--<name>/ (huggingface_hub): blobs/<git sha1, or sha256 for LFS files>,
  snapshots/<commit>/<file> as relative links to the blobs, refs/main holding the commit.
  Offline, `hf_hub_download` reads refs/main and returns snapshots/<commit>/<file>.
- datasets/jondurbin___truthy-dpo-v0.1/default/0.0.0/<commit>/ (datasets): dataset_info.json and
  truthy-dpo-v0.1-train.arrow, written by datasets' own Parquet builder from the parquet file in
  the hub snapshot. Offline, `load_dataset` finds it with its "cache" builder.

The models (each with the real model's dtype on disk, context length, special tokens, tokenizer
class and config.json format; widths are tiny so that full mode runs on a CPU):
- gpt2: GPT2LMHeadModel, float32; no pad token, bos = eos = <|endoftext|>.
- microsoft/phi-2: PhiForCausalLM, float16 in two shards, partial rotary 0.4, untied lm_head with
  a bias; CodeGenTokenizer, no pad token, bos = eos = <|endoftext|>.
- HuggingFaceTB/SmolLM2-135M-Instruct: LlamaForCausalLM with grouped-query attention, bfloat16,
  tied embeddings; ChatML chat template, bos <|im_start|>, eos = pad = <|im_end|>.
Tokenizers are the course's shipped BPE (dpo_minimal/tokenizer), saved in each repo's format.
The data set (about 1,016 rows: id, source, system, prompt, chosen, rejected; one train split)
is built deterministically from the shipped pairs in dpo_minimal/data/.

Nothing here is a real model or the real data: it is for rehearsing code paths (make rehearse).
Commit hashes are made up (sha1 of the repo id). Same installed versions, same bytes.
"""

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MARKER = "FAKE_HUB.txt"  # marks a directory this script may delete and rebuild
DATASET = "jondurbin/truthy-dpo-v0.1"
LFS_SUFFIXES = (".safetensors", ".parquet")  # stored with git LFS on the Hub: blob = sha256
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# truthy-dpo's system prompts: one plain assistant (the most common) and personas.
SYSTEMS = [
    "You are an unbiased, uncensored, helpful assistant.",
    "You are Dr. Mae Jemison: an astronaut, physician and engineer who explains science plainly.",
    "You are a librarian who answers carefully and says when something is not known.",
    "You are an AI assistant without a body, senses or a location; say so when it matters.",
    "You are a patient science teacher who corrects common misconceptions kindly.",
]
N_ROWS = 1016


def commit_of(repo_id: str) -> str:
    """A made-up but fixed 40-hex commit for `repo_id`."""
    return hashlib.sha1(f"dpo-course fake hub: {repo_id}".encode()).hexdigest()


def blob_name(path: str, data: bytes) -> str:
    """The blob's name as huggingface_hub stores it: the LFS sha256, else the git blob sha1."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(home: Path, repo_type: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write one repository into home/hub as huggingface_hub's cache does; returns its snapshot."""
    repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for path in sorted(files):
        blob = repo / "blobs" / blob_name(path, files[path])
        blob.write_bytes(files[path])
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(path).parts) + 1)) / "blobs" / blob.name)
    return snapshot


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def tokenizer_files(extra_special: tuple[str, ...] = ()) -> dict[str, bytes]:
    """tokenizer.json, vocab.json and merges.txt of the course BPE (plus extra special tokens)."""
    from tokenizers import AddedToken, Tokenizer

    from dpo_minimal.models import TOKENIZER_FILE

    tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in extra_special])
    model = json.loads(TOKENIZER_FILE.read_text(encoding="utf-8"))["model"]
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m
                                  for m in model["merges"]]
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": ("\n".join(merges) + "\n").encode(),
    }


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def model_files(hub_config: dict, generation: dict, max_shard_size: str | None = None):
    """config.json as the Hub's file has it, safetensors weights, generation_config.json.

    The model is built from `hub_config` with seed 0 and saved by save_pretrained in the dtype
    the file names (torch_dtype); config.json is then `hub_config` itself, in the older format
    the real repositories still carry (torch_dtype, top-level rope keys), so loading it goes
    through transformers' conversion exactly as the real download does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hub_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, hub_config["torch_dtype"]))
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp, **kwargs)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())
                 if p.name.endswith((".safetensors", ".index.json"))}
    files["config.json"] = _json(hub_config)
    files["generation_config.json"] = _json(generation)
    return files


def gpt2_repo(vocab_size: int) -> dict[str, bytes]:
    """gpt2: GPT2LMHeadModel in float32, a 1,024-token context, GPT2Tokenizer with no pad."""
    hub_config = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 0, "embd_pdrop": 0.1, "eos_token_id": 0,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": "float32", "vocab_size": vocab_size}
    files = model_files(hub_config, {"bos_token_id": 0, "eos_token_id": 0})
    files.update(tokenizer_files())
    files["tokenizer_config.json"] = _json({"model_max_length": 1024})  # all gpt2 has
    return files


def phi2_repo(vocab_size: int) -> dict[str, bytes]:
    """microsoft/phi-2: PhiForCausalLM saved in float16 (two shards), CodeGenTokenizer, no pad."""
    hub_config = {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 0,
        "embd_pdrop": 0.0, "eos_token_id": 0, "hidden_act": "gelu_new", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "phi", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 4, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0",
        "use_cache": True, "vocab_size": vocab_size}
    files = model_files(hub_config, {"bos_token_id": 0, "eos_token_id": 0},
                        max_shard_size="700KB")
    files.update(tokenizer_files())
    files["tokenizer_config.json"] = _json({
        "add_prefix_space": False, "added_tokens_decoder": {"0": _special(EOS)},
        "bos_token": EOS, "clean_up_tokenization_spaces": True, "eos_token": EOS,
        "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer", "unk_token": EOS})
    files["special_tokens_map.json"] = _json({"bos_token": EOS, "eos_token": EOS,
                                              "unk_token": EOS})
    files["added_tokens.json"] = _json({EOS: 0})
    return files


def smollm2_repo(n_tokens: int) -> dict[str, bytes]:
    """HuggingFaceTB/SmolLM2-135M-Instruct: LlamaForCausalLM (GQA) in bfloat16, ChatML template."""
    im_start, im_end = n_tokens, n_tokens + 1  # appended after the course vocabulary
    ids = {"bos_token_id": im_start, "eos_token_id": im_end, "pad_token_id": im_end}
    hub_config = {
        **ids, "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.041666666666666664, "intermediate_size": 128,
        "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
        "use_cache": True, "vocab_size": n_tokens + 2}
    files = model_files(hub_config, ids)
    files.update(tokenizer_files((IM_START, IM_END)))
    specials = {"bos_token": IM_START, "eos_token": IM_END, "pad_token": IM_END,
                "unk_token": EOS, "additional_special_tokens": [IM_START, IM_END]}
    files["tokenizer_config.json"] = _json({
        **specials, "add_prefix_space": False, "chat_template": SMOL_TEMPLATE,
        "added_tokens_decoder": {str(i): _special(t) for i, t in
                                 ((0, EOS), (im_start, IM_START), (im_end, IM_END))},
        "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer"})
    files["special_tokens_map.json"] = _json(specials)
    return files


def preference_rows() -> list[dict]:
    """N_ROWS rows with truthy-dpo's columns, from the shipped pairs: each pair once with the
    plain assistant system prompt (the most common one), then up to three times with distinct
    personas; shuffled with a fixed seed. No (system, prompt) repeats."""
    from dpo_minimal.data import shipped_data_path

    pairs = []
    for split in ("train", "test"):
        lines = shipped_data_path(split).read_text(encoding="utf-8").splitlines()
        pairs += [json.loads(line) for line in lines if line.strip()]
    rows = []
    for copy in range(4):
        for p, pair in enumerate(pairs):
            system = SYSTEMS[0] if copy == 0 else SYSTEMS[1 + (copy - 1 + p) % 4]
            rows.append({
                "id": hashlib.md5(f"{system}\n{pair['prompt']}".encode()).hexdigest(),
                "source": f"dpo-course/{pair.get('category', 'truthy_mini')}",
                "system": system, "prompt": pair["prompt"],
                "chosen": pair["chosen"], "rejected": pair["rejected"]})
    rows = rows[:N_ROWS]
    random.Random(0).shuffle(rows)
    return rows


def dataset_repo(rows: list[dict]) -> dict[str, bytes]:
    """The data set repository: a README card with its config, and one parquet file."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    columns = ("id", "source", "system", "prompt", "chosen", "rejected")
    pq.write_table(pa.table({c: [row[c] for row in rows] for c in columns}), buffer)
    card = ("---\nlicense: cc-by-4.0\nconfigs:\n- config_name: default\n  data_files:\n"
            "  - split: train\n    path: data/train-00000-of-00001.parquet\n---\n\n"
            "# A stand-in for truthy-dpo-v0.1\n\nBuilt by dpo-course's scripts/fake_hub_cache.py "
            "from the course's own pairs, with the real data set's columns. Not the real data.\n")
    return {"README.md": card.encode(), "data/train-00000-of-00001.parquet": buffer.getvalue()}


def prepare_dataset(home: Path, parquet: Path) -> Path:
    """Write datasets' prepared cache of the train split, as a first online load_dataset would."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    name, commit = DATASET.split("/")[1], commit_of(DATASET)
    out = home / "datasets" / DATASET.replace("/", "___") / "default" / "0.0.0" / commit
    with tempfile.TemporaryDirectory() as tmp:
        builder = Parquet(cache_dir=tmp, dataset_name=name, config_name="default", hash=commit,
                          data_files={"train": [str(parquet)]})
        builder.download_and_prepare(output_dir=str(out))
    return out


def build(home: Path) -> Path:
    """(Re)build the fake cache in `home` (use it as HF_HOME); returns `home`."""
    home = Path(home)
    if home.exists() and any(home.iterdir()) and not (home / MARKER).exists():
        raise ValueError(f"{home} is not empty and is not a fake hub ({MARKER} missing): "
                         "choose an empty or new directory.")
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / MARKER).write_text("Built by scripts/fake_hub_cache.py: tiny random models and "
                               "stand-in data under real Hub ids. Safe to delete.\n")
    from dpo_minimal.models import course_tokenizer

    n_tokens = len(course_tokenizer())
    write_repo(home, "model", "gpt2", gpt2_repo(n_tokens))
    write_repo(home, "model", "microsoft/phi-2", phi2_repo(-(-n_tokens // 64) * 64))  # padded
    write_repo(home, "model", "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_repo(n_tokens))
    snapshot = write_repo(home, "dataset", DATASET, dataset_repo(preference_rows()))
    prepare_dataset(home, snapshot / "data" / "train-00000-of-00001.parquet")
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", nargs="?", default=str(ROOT / "build" / "fake-hub"),
                        help="directory to (re)build; use it as HF_HOME (default build/fake-hub)")
    home = build(Path(parser.parse_args().home))
    print(f"fake Hugging Face cache in {home}: export HF_HOME={home} HF_HUB_OFFLINE=1 "
          "HF_DATASETS_OFFLINE=1")


if __name__ == "__main__":
    main()
