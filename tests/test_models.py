"""tiny_model, the shipped tokenizer, load_model's from_pretrained path and LoRA round trips."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, PhiForCausalLM

from dpo_minimal import add_lora, collate_pairs, load_model, sequence_logps, tiny_model
from dpo_minimal.data import tokenize_pair
from dpo_minimal.models import course_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {"prompt": "Where is the nearest bookstore?", "chosen": " I cannot see where you are.",
           "rejected": " Two blocks north of you."}


def _logps(model, tok):
    batch = collate_pairs([tokenize_pair(EXAMPLE, tok, 64, 32)], tok.pad_token_id)
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


@pytest.mark.parametrize("arch, cls", [("gpt2", GPT2LMHeadModel), ("phi", PhiForCausalLM)])
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


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_model("llama")


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
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


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
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
