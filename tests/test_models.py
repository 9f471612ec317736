
"""The architecture registry, tiny_model, the tokenizer, load_model and LoRA round trips."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PhiForCausalLM, Qwen2Config
from transformers.pytorch_utils import Conv1D

from dpo_minimal import (
    TrainConfig,
    add_lora,
    collate_pairs,
    evaluate,
    load_model,
    load_preferences,
    sequence_logps,
    shipped_data_path,
    tiny_model,
    tokenize_preferences,
    train,
)
from dpo_minimal.models import (
    ARCHITECTURES,
    architecture,
    course_tokenizer,
    has_plain_head,
    lora_target_names,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {"prompt": "Where is the nearest bookstore?", "chosen": " I cannot see where you are.",
           "rejected": " Two blocks north of you."}



def _logps(model, tok):
    batch = collate_pairs(tokenize_preferences([EXAMPLE], tok, 64, 32), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])


def test_tokenizer_is_regenerated_byte_for_byte():
    script = ROOT / "scripts" / "train_tokenizer.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tokenizer_special_tokens_and_size():
    tok = course_tokenizer()
    assert 2000 <= len(tok) <= 8192
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    text = "Pencil lead is graphite, not lead."
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch, cls", [("gpt2", GPT2LMHeadModel), ("phi", PhiForCausalLM),
                                       ("llama", LlamaForCausalLM)])
def test_tiny_model_real_class_ids_in_vocab_and_generation(arch, cls):
    model, tok = tiny_model(arch, seed=0)
    assert isinstance(model, cls)
    vocab = model.config.vocab_size
    assert vocab == len(tok)
    for token_id in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        assert 0 <= token_id < vocab
    inputs = tok(["Is the moon made of cheese?"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5) or out[0, -1] == tok.eos_token_id
    again, _ = tiny_model(arch, seed=0)
    other, _ = tiny_model(arch, seed=1)
    torch.testing.assert_close(_logps(model, tok), _logps(again, tok))
    assert not torch.allclose(_logps(model, tok), _logps(other, tok))


def test_tiny_phi_has_untied_head_with_bias_and_partial_rotary():
    model, _ = tiny_model("phi")
    assert model.lm_head.bias is not None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.4


def test_tiny_llama_has_grouped_query_attention_swiglu_rmsnorm_and_a_tied_head():
    model, _ = tiny_model("llama")
    attention, block = model.model.layers[0].self_attn, model.model.layers[0]
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (128, 64)  # 4 : 2
    assert {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in block.mlp.named_children()}
    assert type(block.input_layernorm).__name__ == "LlamaRMSNorm"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown arch 'mamba': use one of gpt2, phi, llama"):
        tiny_model("mamba")


def _module_leaves(model) -> set[str]:
    return {name.split(".")[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_registry_entry_matches_the_real_modules(arch):
    """Each entry's facts, checked against the model it builds (a wrong entry fails here)."""
    entry = ARCHITECTURES[arch]
    model, _ = tiny_model(arch)
    assert type(model) is entry.model_class and model.config.model_type == arch
    assert set(entry.lora_targets) <= _module_leaves(model)
    assert {t for group in entry.shared_inputs for t in group} <= set(entry.lora_targets)
    names = [name for name, _ in model.named_modules()]
    assert sum(name.endswith("." + entry.attn_out_proj) for name in names) == 4  # one per layer
    block = next(m for name, m in model.named_modules() if name.endswith(".0"))
    norms = [type(m).__name__ for m in block.modules()
             if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    kind = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[entry.norm]
    assert len(norms) == entry.norms_per_block and all(n.endswith(kind) for n in norms)
    assert ("gate_proj" in _module_leaves(model)) == (entry.mlp == "swiglu")
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert bool(conv) == entry.fan_in_fan_out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_plain_head_means_logits_are_the_head_of_the_last_hidden_state(arch):
    model, tok = tiny_model(arch)
    assert ARCHITECTURES[arch].plain_head and has_plain_head(add_lora(model, r=4))
    ids = tok(["Is the moon made of cheese?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        head = model.get_output_embeddings()(out.hidden_states[-1])
    torch.testing.assert_close(head, out.logits, atol=0, rtol=0)


def test_architecture_looks_up_models_peft_models_configs_and_names():
    model, _ = tiny_model("llama")
    entry = ARCHITECTURES["llama"]
    assert architecture(model) is entry and architecture(model.config) is entry
    assert architecture("llama") is entry
    assert architecture(add_lora(model, r=4)) is entry  # the base model's config


def test_an_unregistered_family_gets_peft_defaults_and_the_planner_names_the_way_out():
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"'qwen2'.*known: gpt2, phi, llama.*Architecture"):
        architecture(config)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(config)
    assert not has_plain_head(model)  # unknown: the trainer keeps the model's own forward
    assert lora_target_names(model) == ["q_proj", "v_proj"]  # peft's defaults for qwen2
    assert lora_target_names(model, "all-linear") == ["down_proj", "gate_proj", "k_proj",
                                                      "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_model = add_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    assert not peft_model.peft_config["default"].fan_in_fan_out  # nn.Linear, not Conv1D
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters()
            if "lora_A" in n} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_load_model_from_a_saved_directory(tmp_path, arch):
    model, tok = tiny_model(arch)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.pad_token = None  # as gpt2 and phi-2 ship: load_model must set it
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), dtype=torch.float32)
    assert loaded_tok.pad_token == loaded_tok.eos_token
    assert loaded.config.pad_token_id == loaded_tok.eos_token_id
    torch.testing.assert_close(_logps(loaded, loaded_tok), _logps(model, course_tokenizer()))


def test_load_model_refuses_eager_attention_in_fp16(tmp_path):
    with pytest.raises(ValueError, match="sdpa"):
        load_model(str(tmp_path), dtype=torch.float16, attn_implementation="eager")


@pytest.mark.parametrize("arch, targets", [
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ("phi", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_add_lora_targets_and_zero_init(arch, targets):
    model, tok = tiny_model(arch)
    base = _logps(model, tok)
    peft_model = add_lora(model, r=4, alpha=8)
    wrapped = {name.split(".lora_A")[0].split(".")[-1] for name, _ in peft_model.named_parameters()
               if "lora_A" in name}
    assert wrapped == targets
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert peft_model.peft_config["default"].fan_in_fan_out == (arch == "gpt2")
    torch.testing.assert_close(_logps(peft_model, tok), base)  # B = 0: same as the base model


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_adapter_saves_and_reloads_with_identical_logps(tmp_path, arch):
    from peft import PeftModel

    model, tok = tiny_model(arch)
    peft_model = add_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():  # move B away from zero so the adapter changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trained = _logps(peft_model.eval(), tok)
    assert not torch.allclose(trained, _logps(tiny_model(arch)[0], tok))
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_model(arch)[0], tmp_path).eval()
    torch.testing.assert_close(_logps(reloaded, tok), trained, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_fused_gelu_computes_the_same_function_and_restores_the_modules(arch):
    from transformers.activations import NewGELUActivation

    from dpo_minimal.models import TanhGELU, fused_gelu

    model, tok = tiny_model(arch)
    originals = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    assert len(originals) == 4  # one per layer: both architectures use "gelu_new"
    before = _logps(model, tok)
    with fused_gelu(model):
        assert sum(isinstance(m, TanhGELU) for m in model.modules()) == 4
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        fused = _logps(model, tok)
    torch.testing.assert_close(fused, before, atol=1e-5, rtol=1e-6)
    after = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    assert all(a is b for a, b in zip(after, originals, strict=True))  # the same objects back
    with pytest.raises(RuntimeError), fused_gelu(model):
        raise RuntimeError("boom")
    assert not any(isinstance(m, TanhGELU) for m in model.modules())  # restored on error too
    x = torch.linspace(-16, 16, 10_001)
    torch.testing.assert_close(TanhGELU()(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)


def test_llama_starts_at_ln2_and_training_lowers_the_loss():
    """The Llama family through the unchanged trainer: the DPO loss starts at exactly ln 2."""
    data = load_preferences(shipped_data_path("train")).select(range(16))
    model, tok = tiny_model("llama")
    model = add_lora(model, r=4, alpha=8)
    config = TrainConfig(batch_size=4, max_steps=6, max_length=64, max_prompt_length=32,
                         learning_rate=1e-2, progress=False)
    before = evaluate(model, tok, data, config)["loss"]
    history = train(model, tok, data, config)
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6 and abs(before - math.log(2)) < 1e-6
    assert history[0]["rewards/margins"] == 0
    after = evaluate(model, tok, data, config)["loss"]
    assert after < math.log(2) - 0.1  # the pairs it trained on: the policy now prefers chosen



def test_a_tiny_qwen2_trains_with_lora_without_naming_targets():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = course_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    model = add_lora(Qwen2ForCausalLM(config), r=4)
    rows = load_preferences(shipped_data_path("train")).select(range(4))
    history = train(model, tok, rows, TrainConfig(batch_size=2, max_steps=2, max_length=64,
                                                  max_prompt_length=32, progress=False))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    trained = {n.split(".lora_")[0].split(".")[-1] for n, p in model.named_parameters()
               if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}
