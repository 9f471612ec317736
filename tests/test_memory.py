"""The memory planner: phi-2 facts, checkpointing, and the formula against what autograd saves."""

import dataclasses
from contextlib import nullcontext

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import GPT2Config, LlamaConfig, PhiConfig, Qwen2Config

from dpo_minimal import (
    add_lora,
    load_preferences,
    shipped_data_path,
    tiny_model,
    tokenize_preferences,
)
from dpo_minimal.memory import (
    DTYPE_BYTES,
    GIB,
    T4_USABLE_GIB,
    activation_bytes_per_token,
    inferred_architecture,
    lora_targets,
    meta_model,
    plan_memory,
)
from dpo_minimal.models import ARCHITECTURES, course_tokenizer, fused_gelu
from dpo_minimal.train import DTYPES, TrainConfig, disable_dropout, train

PHI2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                 num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                 tie_word_embeddings=False, max_position_embeddings=2048)
# HuggingFaceTB/SmolLM2-135M(-Instruct)'s config.json
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=8192, tie_word_embeddings=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The forwards here are small: more threads only wait for each other on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    assert per_token / 1e3 == pytest.approx(160, abs=1)  # the docstring's figures
    assert activation_bytes_per_token(PHI2, "float16", lora_r=16) / 1e3 == pytest.approx(99, abs=1)
    h, r, a, T, s = 2560, 16, 32, 512, 2  # the docstring's formula, padded batch
    assert per_token == 4 * h + 8 + s * (9 * h + 5 * f + 6 * r + T) + 4 * a


def test_logits_term():
    """Four float32 (N, V) tensors at the response positions, whatever the compute dtype: the
    logits logsumexp keeps, and x - lse, its exp and the product in logsumexp's backward."""
    for dtype in ("bfloat16", "float32"):
        plan = plan_memory(PHI2, batch_pairs=1, seq_len=100, dtype=dtype, lora_r=8,
                           response_fraction=0.5)
        rows, vocab = 2, 51200
        assert plan["logits"] == pytest.approx(rows * 99 * 0.5 * vocab * 4 * 4 / GIB)


def test_the_planner_rows_of_the_h200_check():
    """The GPU check's rows (issue 26: measured peaks on an H200, GiB, torch.cuda's allocated
    bytes) against the plan less its CUDA allowance, with gpu_check's response_fraction 0.5."""
    measured = [  # (config, pairs, checkpointing, dtype, measured peak)
        (PHI2, 2, True, "float16", 6.62), (PHI2, 2, False, "float16", 12.3),
        (PHI2, 2, False, "bfloat16", 12.3), (GPT2Config(), 8, False, "bfloat16", 6.09)]
    for config, pairs, checkpointing, dtype, peak in measured:
        plan = plan_memory(config, batch_pairs=pairs, seq_len=512, dtype=dtype, lora_r=16,
                           gradient_checkpointing=checkpointing, response_fraction=0.5)
        assert plan["total"] - plan["cuda_context"] == pytest.approx(peak, rel=0.10)


def test_lora_targets_match_peft():
    for arch in ARCHITECTURES:
        model, _ = tiny_model(arch)
        shapes = lora_targets(meta_model(model.config))
        peft_model = add_lora(model, r=4)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == sum(4 * (d_in + d_out) for _, d_in, d_out in shapes)
    gpt2 = lora_targets(meta_model(GPT2Config()))
    assert (gpt2[0][1], gpt2[0][2]) == (768, 2304)  # Conv1D c_attn stores (in, out)


def _small_config(arch, layers):
    """Small but not tiny configs (wide enough that per-token tensors dominate)."""
    if arch == "phi":
        return PhiConfig(vocab_size=500, hidden_size=160, intermediate_size=640,
                         num_hidden_layers=layers, num_attention_heads=2,
                         partial_rotary_factor=0.4, tie_word_embeddings=False)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return LlamaConfig(vocab_size=500, hidden_size=160, intermediate_size=432,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return GPT2Config(vocab_size=500, n_embd=160, n_layer=layers, n_head=2, bos_token_id=0,
                      eos_token_id=0)


def _saved_bytes(arch, layers, dtype, checkpointing, rows=4, seq=64, fused=False, padded=True,
                 attn="sdpa"):
    """Bytes of the distinct tensors autograd saves in one LoRA forward (weights excluded)."""
    torch.manual_seed(0)
    config = _small_config(arch, layers)
    model = ARCHITECTURES[arch].model_class(config)
    model.config._attn_implementation = attn
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
    mask = torch.ones(rows, seq, dtype=torch.long)
    if padded:
        mask[0, -seq // 4:] = 0  # one row shorter than the others, as in every DPO batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)
    gelu = fused_gelu(model) if fused else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, gelu:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(saved.values()), config


def _measured_per_token(arch, dtype, rows=4, seq=64, **kwargs):
    """Bytes per token of one layer: 4 layers less 2, at 2 x rows less at rows.

    The double difference cancels what does not grow with both layers and tokens: the
    embeddings, the logits, and the per-layer copies of the LoRA weights that autocast makes.
    """
    def two_layers(n):
        large, config = _saved_bytes(arch, 4, dtype, False, n, seq, **kwargs)
        return large - _saved_bytes(arch, 2, dtype, False, n, seq, **kwargs)[0], config

    more, config = two_layers(2 * rows)
    return (more - two_layers(rows)[0]) / (2 * rows * seq), config


CASES = [  # (arch, fused GELU, padded batch, attention)
    ("phi", True, True, "sdpa"), ("phi", False, True, "sdpa"),
    ("gpt2", True, True, "sdpa"), ("gpt2", False, True, "sdpa"),
    ("llama", False, True, "sdpa"), ("llama", False, False, "sdpa"),
    ("llama", False, True, "eager"),
]


@pytest.mark.parametrize("arch, fused, padded, attn", CASES,
                         ids=["-".join(map(str, case)) for case in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_autograd(arch, fused, padded, attn, dtype):
    """Per-layer bytes from the formula vs what autograd really saves."""
    rows, seq = 4, 64
    measured, config = _measured_per_token(arch, dtype, rows, seq, fused=fused, padded=padded,
                                           attn=attn)
    predicted = activation_bytes_per_token(config, dtype, lora_r=8, seq_len=seq,
                                           attn_implementation=attn, fused_gelu=fused,
                                           padded=padded)
    # The formula counts what CUDA keeps. Where this CPU differs, exactly (llama: nowhere,
    # RMSNorm casts to float32 in Python): CPU autocast runs layer_norm in bf16, so it keeps a
    # bf16 input and bf16 mean and 1/std, 2h + 4 bytes, not 4h + 8; and CPU sdpa returns its
    # output in phi's (B, heads, T, d) layout, so dense reads a copy of it (CUDA's kernels return
    # (B, T, heads, d), as CPU does for GPT-2 and Llama, and the copy is a view).
    entry, h = ARCHITECTURES[arch], config.hidden_size
    cpu = predicted
    if entry.norm == "layernorm" and dtype != torch.float32:
        cpu -= entry.norms_per_block * (2 * h + 4)
    if arch == "phi" and dtype == torch.float32:
        cpu += 4 * h
    assert measured == cpu
    assert cpu == pytest.approx(predicted, rel=0.11)  # the CPU/CUDA differences are small
    small, _ = _saved_bytes(arch, 2, dtype, True, rows, seq, padded=padded, attn=attn)
    large, _ = _saved_bytes(arch, 4, dtype, True, rows, seq, padded=padded, attn=attn)
    per_layer = (large - small) / 2 / (rows * seq)  # checkpointing: the layer input only
    assert per_layer == pytest.approx(config.hidden_size * dtype.itemsize, rel=0.02)


def test_grouped_query_attention_keeps_narrow_k_and_v_only_without_padding():
    """With a mask, transformers repeats k and v to every head before sdpa (and sdpa keeps a
    copy of the mask); without one they stay kv wide. Both match autograd above."""
    config = _small_config("llama", 2)
    h, kv, seq = 160, 80, 64
    for dtype in ("float32", "bfloat16"):
        s = DTYPE_BYTES[DTYPES[dtype]]
        padded = activation_bytes_per_token(config, dtype, lora_r=8, seq_len=seq)
        unpadded = activation_bytes_per_token(config, dtype, lora_r=8, seq_len=seq,
                                              padded=False)
        assert padded - unpadded == s * (2 * (h - kv) + seq)


def test_smollm2_135m_plan_on_the_meta_device():
    """A planner entry for a modern instruct model (Llama family), from its config alone."""
    model = meta_model(SMOLLM2)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings
    plan = plan_memory(SMOLLM2, batch_pairs=8, seq_len=512, dtype="bfloat16", lora_r=16)
    assert plan["weights"] == pytest.approx(134_515_008 * 2 / GIB)
    h, f, kv, layers, r, a, T, s = 576, 1536, 192, 30, 16, 9, 512, 2
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + f))  # q, k, v, o, gate/up/down
    assert plan["lora_parameters"] == pytest.approx(layers * per_layer * 4 / GIB)
    per_token = (2 * (4 * h + 4) + s * (6 * h + f + 7 * r) + s * (4 * h + T) + 4 * a
                 + s * 3 * f)  # norms, LoRA inputs and A outputs, attention and mask, SwiGLU
    assert activation_bytes_per_token(SMOLLM2, "bfloat16", lora_r=r, seq_len=T) == per_token
    assert per_token / 1e3 == pytest.approx(30, abs=1)  # the docstring's figure
    tokens = 2 * 8 * 512
    assert plan["activations_no_checkpointing"] == pytest.approx(
        layers * tokens * per_token / GIB)
    assert plan["total"] < T4_USABLE_GIB  # 8 pairs x 512 tokens fit a T4 with checkpointing
    assert plan["logits"] > plan["weights"]  # V = 49152: the logits, not the weights, dominate


def test_an_unregistered_family_is_planned_from_its_own_blocks():
    qwen2 = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    inferred = inferred_architecture(qwen2)
    assert (inferred.mlp, inferred.norm, inferred.norms_per_block) == ("swiglu", "rmsnorm", 2)
    assert inferred.lora_targets == ("q_proj", "v_proj")  # peft's defaults for qwen2
    # Read off the model, it is planned as the Llama entry with those targets would plan it
    like_llama = dataclasses.replace(ARCHITECTURES["llama"], lora_targets=inferred.lora_targets,
                                     plain_head=False)
    sizes = dict(batch_pairs=1, seq_len=64, dtype="bfloat16")
    assert plan_memory(qwen2, **sizes) == plan_memory(qwen2, **sizes, arch=like_llama)
    # Qwen2's blocks are Llama's (with q, k, v biases): the Llama entry describes them
    as_llama = plan_memory(qwen2, **sizes, arch=ARCHITECTURES["llama"])
    n_lora = 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert as_llama["lora_parameters"] == pytest.approx(n_lora * 4 / GIB)


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


class LiveTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensors created under it: a CPU stand-in for
    `torch.cuda.max_memory_allocated`.

    Every aten call's outputs are recorded by storage (views share one); a storage counts until
    it is freed (a weak reference expires). Storages made before (`known`: the weights) are not
    counted. It sees what autograd's backward creates too, since that runs on this thread on CPU.
    """

    def __init__(self, known=()):
        super().__init__()
        self.known = {s.data_ptr() for s in known}
        self.live: dict[int, tuple] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if storage.nbytes() and ptr not in self.live and ptr not in self.known:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _long_pairs(n: int) -> list[dict]:
    """Pairs whose prompt and responses are long enough that every row is cut to max_length."""
    rows = load_preferences(shipped_data_path("train")).to_list()
    return [{key: " ".join(rows[(i + k) % len(rows)][key] for k in range(12))
             for key in ("prompt", "chosen", "rejected")} for i in range(n)]


MEASURED_CONFIGS = {  # (config, pairs, tokens): small enough for seconds on one CPU core
    # GPT-2's proportions at 8 x 512: the vocabulary-wide tensors are half of the peak
    "gpt2-shaped": (GPT2Config(vocab_size=8192, n_embd=128, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0), 4, 128),
    # phi-2's proportions at 2 x 512: the activations dominate
    "phi-shaped": (PhiConfig(vocab_size=4096, hidden_size=320, intermediate_size=1280,
                             num_hidden_layers=4, num_attention_heads=4,
                             partial_rotary_factor=0.4, tie_word_embeddings=False), 2, 128),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(MEASURED_CONFIGS))
def test_plan_matches_the_measured_peak_of_a_training_step(name, dtype):
    """plan_memory's total (less the CUDA allowance) vs the peak of live tensor bytes of two
    LoRA DPO steps of `dpo_minimal.train` on CPU: weights, adapter, AdamW, activations and the
    log-softmax's vocabulary-wide tensors, within 10 %."""
    config, pairs, tokens = MEASURED_CONFIGS[name]
    torch.manual_seed(0)
    model = add_lora(ARCHITECTURES[config.model_type].model_class(config).to(DTYPES[dtype]),
                     r=16)
    tokenizer = course_tokenizer()
    data = _long_pairs(2 * pairs)
    train_config = TrainConfig(batch_size=pairs, max_length=tokens, max_prompt_length=tokens // 2,
                               max_steps=2, dtype=dtype, progress=False)
    tokenised = tokenize_preferences(data, tokenizer, tokens, tokens // 2)
    lengths = {len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in tokenised}
    lengths |= {len(p["prompt_ids"]) + len(p["rejected_ids"]) for p in tokenised}
    assert lengths == {tokens}  # every row is cut to its full length: the planner's worst case
    # positions that predict a response token (the first is predicted by the last prompt token)
    response = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenised[:pairs])
    counter = LiveTensorBytes(known=[p.untyped_storage() for p in model.parameters()])
    with counter:
        train(model, tokenizer, data, train_config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    measured = (weights + counter.peak) / GIB
    plan = plan_memory(config, batch_pairs=pairs, seq_len=tokens, dtype=dtype, lora_r=16,
                       gradient_checkpointing=False,
                       response_fraction=response / (2 * pairs * (tokens - 1)))
    planned = plan["total"] - plan["cuda_context"]
    print(f"{name} {dtype}: measured {measured * 1024:.2f} MiB, planned {planned * 1024:.2f} MiB")
    assert measured == pytest.approx(planned, rel=0.10), (measured * 1024, planned * 1024)
