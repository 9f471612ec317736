"""Models: tiny offline versions of the real architectures, the from_pretrained path, LoRA.

What the library knows about a model family lives in one place, `ARCHITECTURES`; adding a family
is one `Architecture` entry.
"""

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

TOKENIZER_FILE = Path(__file__).parent / "tokenizer" / "tokenizer.json"
# The shipped pretrained tiny models, one folder per arch (scripts/pretrain.py).
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Architecture:
    """What dpo_minimal knows about one transformers model family (one `config.model_type`).

    model_class: the transformers causal-LM class.
    tiny_config: token ids (vocab_size, bos/eos/pad_token_id) -> the config of `tiny_model`.
    lora_targets: the modules LoRA wraps by default (peft's target_modules).
    fan_in_fan_out: the targets store their weight as (in, out), like GPT-2's Conv1D.
    plain_head: the logits are exactly lm_head(last hidden state), no scaling or soft-capping,
        so a trainer may apply the head at the response positions only.
    For the memory planner (`dpo_minimal.memory`):
    mlp: "gelu" (fc1 -> tanh GELU -> fc2) or "swiglu" (down(silu(gate(x)) * up(x))).
    norm, norms_per_block: "layernorm" or "rmsnorm", and how many a decoder block has.
    shared_inputs: groups of LoRA targets that read one and the same tensor (a norm's output).
    attn_out_proj: the attention's output projection, as the end of its module name.
    """

    model_class: type
    tiny_config: Callable[[dict], PreTrainedConfig]
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool
    plain_head: bool
    mlp: str
    norm: str
    norms_per_block: int
    shared_inputs: tuple[tuple[str, ...], ...]
    attn_out_proj: str


ARCHITECTURES = {  # keyed by transformers' config.model_type
    # GPT-2's attention and MLP are Conv1D (weights stored transposed); its lm_head is tied to
    # the embeddings, so LoRA leaves it alone.
    "gpt2": Architecture(
        GPT2LMHeadModel,
        lambda ids: GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=512, **ids),
        lora_targets=("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True, plain_head=True,
        mlp="gelu", norm="layernorm", norms_per_block=2, shared_inputs=(),
        attn_out_proj="attn.c_proj"),
    # phi-2: a parallel block (one norm feeds attention and MLP), partial rotary, untied head.
    "phi": Architecture(
        PhiForCausalLM,
        lambda ids: PhiConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=512, partial_rotary_factor=0.4, tie_word_embeddings=False,
            **ids),
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        fan_in_fan_out=False, plain_head=True, mlp="gelu", norm="layernorm", norms_per_block=1,
        shared_inputs=(("q_proj", "k_proj", "v_proj", "fc1"),), attn_out_proj="self_attn.dense"),
    # Llama (SmolLM2 and many small modern models): SwiGLU, RMSNorm, grouped-query attention.
    "llama": Architecture(
        LlamaForCausalLM,
        lambda ids: LlamaConfig(
            hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **ids),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"),
        fan_in_fan_out=False, plain_head=True, mlp="swiglu", norm="rmsnorm", norms_per_block=2,
        shared_inputs=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
        attn_out_proj="self_attn.o_proj"),
}


def model_type(model_or_config) -> str:
    """`config.model_type` of a model (peft-wrapped too: its base model's), a config or a str."""
    if hasattr(model_or_config, "get_base_model"):  # a peft model
        model_or_config = model_or_config.get_base_model()
    if isinstance(model_or_config, str):
        return model_or_config
    return getattr(model_or_config, "config", model_or_config).model_type


def architecture(model_or_config) -> Architecture:
    """The `ARCHITECTURES` entry of a model (peft-wrapped too), a config, or a model_type.

    Raises ValueError for a family that has no entry, naming the known ones.
    """
    name = model_type(model_or_config)
    if name not in ARCHITECTURES:
        raise ValueError(
            f"model_type {name!r} has no entry in dpo_minimal.models.ARCHITECTURES (known: "
            f"{', '.join(ARCHITECTURES)}): add an Architecture entry for it (model class, tiny "
            "config, LoRA targets, head, MLP and norms).")
    return ARCHITECTURES[name]


def has_plain_head(model) -> bool:
    """True if the model's family is registered with `plain_head` (logits = lm_head(hidden)).

    False for an unregistered family: the caller then runs the model's own forward, which is
    always right, only slower.
    """
    name = model_type(model)
    return name in ARCHITECTURES and ARCHITECTURES[name].plain_head


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

    `<|endoftext|>` is its bos, eos and pad token, as in GPT-2 and phi-2. Its chat template
    (tokenizer/chat_template.jinja) writes one "Role: content" line per message and ends a
    generation prompt with "Assistant:".
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token=EOS, eos_token=EOS, pad_token=EOS
    )
    tokenizer.chat_template = (TOKENIZER_FILE.parent / "chat_template.jinja").read_text()
    return tokenizer


def tiny_model(arch: str = "gpt2", seed: int = 0, pretrained: bool = False):
    """A randomly initialised small model of a real architecture, with the course tokenizer.

    arch is a key of `ARCHITECTURES`: "gpt2" gives a `GPT2LMHeadModel`, "phi" a
    `PhiForCausalLM` (partial rotary, untied lm_head with bias, like phi-2), "llama" a
    `LlamaForCausalLM` (SwiGLU, RMSNorm, 2 key/value heads for 4 query heads, tied head, like
    SmolLM2). All have 4 layers of width 128 and run in seconds on CPU.
    `pretrained=True` ("gpt2" or "phi"; `seed` unused) loads instead the shipped model of that
    arch trained on the course's task world (pretrained/{arch}/, float32; scripts/pretrain.py
    and the folder's RECIPE.md).
    Returns (model, tokenizer); the model is in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHITECTURES)}.")
    tokenizer = course_tokenizer()
    if pretrained:
        if not (PRETRAINED_DIR / arch).is_dir():
            shipped = ", ".join(repr(d.name) for d in sorted(PRETRAINED_DIR.iterdir())
                                if d.is_dir())
            raise ValueError(f"no pretrained weights ship for arch {arch!r}: use {shipped}, "
                             "or pretrained=False for a randomly initialised model.")
        model_class = ARCHITECTURES[arch].model_class
        model = model_class.from_pretrained(PRETRAINED_DIR / arch, dtype=torch.float32).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    config = ARCHITECTURES[arch].tiny_config(dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch].model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(name: str, dtype: torch.dtype | None = None, device: str | None = None,
               attn_implementation: str = "sdpa"):
    """`from_pretrained` for "gpt2", "microsoft/phi-2", a local directory, or a modern instruct
    model of the Llama family such as "HuggingFaceTB/SmolLM2-135M-Instruct".

    Sets the pad token to EOS when the tokenizer has none (GPT-2 and phi-2 have none). Never
    uses trust_remote_code: all three are native in transformers. Keep sdpa attention in fp16;
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


def lora_target_names(model, target_modules: list[str] | str | None = None) -> list[str]:
    """The module names LoRA wraps: `target_modules`, or the family's defaults.

    Defaults come from `ARCHITECTURES` for the course's families, else from peft's per-family
    table (e.g. Qwen2, Mistral: q_proj, v_proj), else every linear layer but the output head.
    "all-linear" (peft's name) asks for the last one on any model.
    """
    if target_modules in ("all-linear", ["all-linear"]):
        return _all_linear(model)
    if target_modules is not None:
        return list(target_modules)
    if model_type(model) in ARCHITECTURES:
        return list(ARCHITECTURES[model_type(model)].lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    return list(PEFT.get(model_type(model), ())) or _all_linear(model)


def _all_linear(model) -> list[str]:
    """The names of every Linear (or GPT-2 Conv1D) layer, the output head excepted."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             target_modules: list[str] | str | None = None):
    """Wrap `model` in a peft LoRA adapter; the base weights are frozen.

    Default targets are the family's `Architecture.lora_targets`: GPT-2 c_attn, c_proj, c_fc
    (Conv1D, fan_in_fan_out); phi q_proj, k_proj, v_proj, dense, fc1, fc2; Llama q_proj,
    k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. Another family gets peft's defaults
    (`lora_target_names`); target_modules="all-linear" wraps every linear layer but the head.
    LoRA's B starts at zero, so the wrapped model computes exactly what the base model does
    until it is trained.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r} (try 16).")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}: the update is scaled by "
                         "alpha / r, so alpha <= 0 trains nothing (or backwards); try 2 * r.")
    targets = lora_target_names(model, target_modules)
    if model_type(model) in ARCHITECTURES:
        fan_in_fan_out = ARCHITECTURES[model_type(model)].fan_in_fan_out
    else:  # an unregistered family: Conv1D layers store their weight as (in, out)
        fan_in_fan_out = any(isinstance(module, Conv1D) for name, module in model.named_modules()
                             if name.split(".")[-1] in targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated name: not our news
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        return get_peft_model(model, config)
