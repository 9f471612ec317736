"""The memory planner: phi-2 facts, checkpointing, and the formula against what autograd saves."""

from contextlib import nullcontext

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

from dpo_minimal import add_lora, tiny_model
from dpo_minimal.memory import (
    GIB,
    T4_USABLE_GIB,
    activation_bytes_per_token,
    lora_targets,
    meta_model,
    plan_memory,
)
from dpo_minimal.models import fused_gelu
from dpo_minimal.train import disable_dropout

PHI2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                 num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                 tie_word_embeddings=False, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def phi2_plans():
    kwargs = {"batch_pairs": 2, "seq_len": 512, "dtype": torch.float16, "lora_r": 16}
    return (plan_memory(PHI2, gradient_checkpointing=True, **kwargs),
            plan_memory(PHI2, gradient_checkpointing=False, **kwargs))


def test_meta_model_is_offline_and_counts_phi2():
    model = meta_model(PHI2)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.78e9, rel=2e-3)


def test_phi2_fp16_weights_and_lora(phi2_plans):
    plan, _ = phi2_plans
    assert plan["weights"] == pytest.approx(5.18, abs=0.01)
    h, f, layers, r = 2560, 10240, 32, 16
    per_layer = r * (3 * (h + h) + (h + h) + (h + f) + (f + h))  # q, k, v, dense, fc1, fc2
    n_lora = layers * per_layer
    assert plan["lora_parameters"] == pytest.approx(n_lora * 4 / GIB)
    assert plan["optimizer_state"] == pytest.approx(2 * n_lora * 4 / GIB)
    adapter = plan["lora_parameters"] + plan["lora_gradients"] + plan["optimizer_state"]
    assert 0.3 < adapter * GIB / 1e9 < 0.45  # "about 0.4 GB including the optimiser"


def test_checkpointing_reduces_activations_and_fits_a_t4(phi2_plans):
    ckpt, full = phi2_plans
    assert ckpt["activations"] < full["activations"] / 10
    assert ckpt["activations_no_checkpointing"] == full["activations"]
    assert 6 < ckpt["total"] < 9 <= T4_USABLE_GIB
    # checkpointing keeps each layer's fp16 input plus one layer's activations
    tokens, h, layers = 2 * 2 * 512, 2560, 32
    one_layer = full["activations"] / layers
    assert ckpt["activations"] == pytest.approx(layers * tokens * h * 2 / GIB + one_layer)
    parts = ("weights", "lora_parameters", "lora_gradients", "optimizer_state", "activations",
             "logits", "cuda_context")
    assert ckpt["total"] == pytest.approx(sum(ckpt[k] for k in parts))


def test_fused_gelu_saves_three_mlp_tensors_per_token_and_layer(phi2_plans):
    _, fused = phi2_plans  # no checkpointing, dpo_minimal's default GELU
    unfused = plan_memory(PHI2, batch_pairs=2, seq_len=512, dtype=torch.float16, lora_r=16,
                          gradient_checkpointing=False, fused_gelu=False)
    tokens, f, layers = 2 * 2 * 512, 10240, 32
    saved = unfused["activations"] - fused["activations"]
    assert saved == pytest.approx(layers * tokens * 3 * f * 2 / GIB)  # x/2, tanh, 1 + tanh
    assert fused["total"] < T4_USABLE_GIB < unfused["total"]  # the planner's verdict flips
    per_token = activation_bytes_per_token(PHI2, "float16", lora_r=16, fused_gelu=False)
    assert per_token / 1e3 == pytest.approx(159, abs=1)  # the docstring's figures
    assert activation_bytes_per_token(PHI2, "float16", lora_r=16) / 1e3 == pytest.approx(97, abs=1)


def test_logits_term():
    plan = plan_memory(PHI2, batch_pairs=1, seq_len=100, dtype="bfloat16", lora_r=8,
                       response_fraction=0.5)
    rows, vocab = 2, 51200
    expected = rows * 100 * vocab * 2 + rows * 99 * 0.5 * vocab * 4
    assert plan["logits"] == pytest.approx(expected / GIB)


def test_lora_targets_match_peft():
    for arch in ("gpt2", "phi"):
        model, _ = tiny_model(arch)
        shapes = lora_targets(meta_model(model.config))
        peft_model = add_lora(model, r=4)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == sum(4 * (d_in + d_out) for _, d_in, d_out in shapes)
    gpt2 = lora_targets(meta_model(GPT2Config()))
    assert (gpt2[0][1], gpt2[0][2]) == (768, 2304)  # Conv1D c_attn stores (in, out)


def _saved_bytes(arch, layers, dtype, checkpointing, rows=4, seq=64, fused=False):
    """Bytes of the distinct tensors autograd saves in one LoRA forward (weights excluded)."""
    torch.manual_seed(0)
    if arch == "phi":
        config = PhiConfig(vocab_size=500, hidden_size=160, intermediate_size=640,
                           num_hidden_layers=layers, num_attention_heads=2,
                           partial_rotary_factor=0.4, tie_word_embeddings=False)
        model = PhiForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=500, n_embd=160, n_layer=layers, n_head=2,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    model.config._attn_implementation = "sdpa"
    model = add_lora(model.to(dtype), r=8)
    disable_dropout(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 500, (rows, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)
    gelu = fused_gelu(model) if fused else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, gelu:
        model(input_ids=ids, use_cache=False)
    return sum(saved.values()), config


@pytest.mark.parametrize("fused", [True, False], ids=["fused_gelu", "gelu_new"])
@pytest.mark.parametrize("arch", ["phi", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_autograd(arch, dtype, fused):
    """Per-layer bytes from the formula vs what autograd really saves (two models' difference)."""
    rows, seq = 4, 64
    small, _ = _saved_bytes(arch, 2, dtype, False, rows, seq, fused)
    large, config = _saved_bytes(arch, 4, dtype, False, rows, seq, fused)
    measured = (large - small) / 2 / (rows * seq)
    predicted = activation_bytes_per_token(config, dtype, lora_r=8, seq_len=seq,
                                           fused_gelu=fused)
    # CPU autocast keeps layer_norm in bf16 where CUDA's runs it in fp32: a few % apart.
    assert measured == pytest.approx(predicted, rel=0.08)
    small, _ = _saved_bytes(arch, 2, dtype, True, rows, seq)
    large, _ = _saved_bytes(arch, 4, dtype, True, rows, seq)
    per_layer = (large - small) / 2 / (rows * seq)  # checkpointing: the layer input only
    assert per_layer == pytest.approx(config.hidden_size * dtype.itemsize, rel=0.02)


def test_full_fine_tuning_of_phi2_needs_a_big_gpu():
    plan = plan_memory(PHI2, batch_pairs=2, seq_len=512, dtype="float16", lora_r=0)
    assert plan["weights"] == pytest.approx(2 * 5.18, abs=0.02)  # float32 master weights
    assert plan["total"] > 40


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        plan_memory(PHI2, batch_pairs=0, seq_len=512, dtype="float16")
    with pytest.raises(ValueError):
        plan_memory(PHI2, batch_pairs=1, seq_len=512, dtype="int8")
    with pytest.raises(ValueError):
        plan_memory(PHI2, batch_pairs=1, seq_len=512, dtype="float16", attn_implementation="x")
