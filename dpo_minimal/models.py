"""Models: tiny offline versions of the real architectures, the from_pretrained path, LoRA."""

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

TOKENIZER_FILE = Path(__file__).parent / "tokenizer" / "tokenizer.json"
# The shipped pretrained tiny GPT-2 (scripts/pretrain.py, see its RECIPE.md).
PRETRAINED_DIR = Path(__file__).parent / "pretrained" / "gpt2"
EOS = "<|endoftext|>"
# Where LoRA goes by default. GPT-2's attention and MLP are Conv1D (weights stored transposed),
# so peft needs fan_in_fan_out=True; its lm_head is tied to the embeddings, so it gets none.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


class TanhGELU(torch.nn.Module):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as PyTorch's one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


@contextmanager
def fused_gelu(model):
    """Inside the block, run the model's Python tanh GELU as one fused kernel; then restore it.

    GPT-2 and phi-2 use transformers' "gelu_new" (and some models "gelu_fast"): the tanh
    approximation written as about eight elementwise ops, each a pass over a (rows, T, f) tensor,
    four of which autograd keeps for the backward pass. `TanhGELU` computes the same function
    (equal to float rounding, ~5e-7 at |x| = 16) in one pass and keeps only its input. Modules
    of other types are left alone; the swapped ones are put back on exit, even on error.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation

    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                swapped.append((parent, name, child))
    for parent, name, _ in swapped:
        setattr(parent, name, TanhGELU())
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def course_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE tokenizer (scripts/train_tokenizer.py rebuilds it).

    `<|endoftext|>` is its bos, eos and pad token, as in GPT-2 and phi-2.
    """
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token=EOS, eos_token=EOS, pad_token=EOS
    )


def tiny_model(arch: str = "gpt2", seed: int = 0, pretrained: bool = False):
    """A randomly initialised small model of a real architecture, with the course tokenizer.

    arch "gpt2" gives a `GPT2LMHeadModel`, "phi" a `PhiForCausalLM` (partial rotary, untied
    lm_head with bias, like phi-2). Both have 4 layers of width 128 and run in seconds on CPU.
    `pretrained=True` (gpt2 only; `seed` unused) loads instead the shipped GPT-2 trained on the
    task world's SFT corpus (PRETRAINED_DIR, float32). Returns (model, tokenizer); the model is
    in eval mode.
    """
    tokenizer = course_tokenizer()
    if pretrained:
        if arch != "gpt2":
            raise ValueError(f"no pretrained weights ship for arch {arch!r}: use 'gpt2', or "
                             "pretrained=False for a randomly initialised model.")
        model = GPT2LMHeadModel.from_pretrained(PRETRAINED_DIR, dtype=torch.float32).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=512, **ids)
        model_class = GPT2LMHeadModel
    elif arch == "phi":
        config = PhiConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=512, partial_rotary_factor=0.4, tie_word_embeddings=False,
            **ids,
        )
        model_class = PhiForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}: use 'gpt2' or 'phi'.")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(name: str, dtype: torch.dtype | None = None, device: str | None = None,
               attn_implementation: str = "sdpa"):
    """`from_pretrained` for "gpt2", "microsoft/phi-2" or a local directory.

    Sets the pad token to EOS when the tokenizer has none (GPT-2 and phi-2 have none). Never
    uses trust_remote_code: phi-2 is native in transformers. Keep sdpa attention in fp16;
    phi-2's eager attention overflows there. Returns (model, tokenizer), the model in eval mode.
    """
    if dtype == torch.float16 and attn_implementation == "eager":
        raise ValueError("eager attention overflows in float16 (phi-2 gives NaN): use 'sdpa'.")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, attn_implementation=attn_implementation
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def lora_target_names(model, target_modules: list[str] | None = None) -> list[str]:
    """`target_modules`, or the architecture's defaults from LORA_TARGETS (else ValueError)."""
    if target_modules is not None:
        return target_modules
    arch = model.config.model_type
    if arch not in LORA_TARGETS:
        raise ValueError(f"no default LoRA targets for model_type {arch!r}: pass "
                         "target_modules, e.g. the names of its attention projections.")
    return LORA_TARGETS[arch]


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             target_modules: list[str] | None = None):
    """Wrap `model` in a peft LoRA adapter; the base weights are frozen.

    Default targets per architecture: GPT-2 c_attn, c_proj, c_fc (Conv1D, fan_in_fan_out);
    phi q_proj, k_proj, v_proj, dense, fc1, fc2. LoRA's B starts at zero, so the wrapped model
    computes exactly what the base model does until it is trained.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_names(model, target_modules),
        fan_in_fan_out=model.config.model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
