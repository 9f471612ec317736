"""TrainConfig (every setting of a run, each checked on construction), History (what a run
records) and the checks a run makes of its model before any work."""

import json
import math
import os
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .logprobs import DTYPES, _is_peft
from .losses import check_loss_settings


def _field(default, help: str, **flag):
    """A dataclass field with its help text (the command line's too) and any argparse extras
    (metavar, choices) for HfArgumentParser."""
    return field(default=default, metadata={"help": help, **flag})


SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainConfig:
    """Everything a DPO run depends on. Same config, data and seed give the same losses (CPU)."""

    # Each field's help is its command-line help too (dpo_minimal.cli).
    beta: float = _field(
        0.1, "strength of the KL penalty: larger keeps the policy nearer the reference")
    learning_rate: float = _field(
        5e-4, "AdamW's peak rate; LoRA ~5e-4, full fine-tuning ~1e-6 (TRL's)")
    batch_size: int = _field(4, "pairs per micro-batch, per process")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimiser step")
    max_length: int = _field(256, "tokens of prompt + response; responses are cut from the right")
    max_prompt_length: int = _field(128, "prompt tokens kept, cut from the left")
    max_steps: int = _field(100, "optimiser steps")
    loss_type: str = _field("sigmoid", "a key of dpo_minimal.losses.LOSSES")
    label_smoothing: float = _field(0.0, "assumed share of flipped labels (cDPO / robust DPO)")
    simpo_gamma: float = _field(0.5, "SimPO's target reward margin")
    desirable_weight: float = _field(
        1.0, "KTO's lambda_D, the weight of desirable (chosen) examples")
    undesirable_weight: float = _field(1.0, "KTO's lambda_U, the weight of undesirable examples")
    seed: int = _field(0, "data order and torch's random state")
    dtype: str = _field("float32", "compute dtype (autocast); float16 needs CUDA (GradScaler)")
    gradient_checkpointing: bool = _field(
        False, "recompute activations in the backward: less memory")
    warmup_steps: int = _field(0, "steps of linear learning-rate warmup")
    lr_scheduler: str = _field("cosine", "cosine | linear | constant, after a linear warmup")
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this (None: no clipping)")
    weight_decay: float = _field(0.0, "AdamW's decoupled weight decay")
    dropout: float = _field(
        0.0, "dropout probability of the policy's training passes (0: off, as TRL); full "
        "fine-tuning only, whose reference is frozen without dropout")
    eval_every: int = _field(0, "evaluate on eval_data every N steps (0: only at the end)")
    eval_batch_size: int = _field(8, "pairs per evaluation batch")
    device: str | None = _field(None, "where to train (None: the model's device)")
    progress: bool = _field(True, "show a tqdm progress bar")
    logging_steps: int = _field(0, "print a line of metrics every N steps (0: never)")
    fused_gelu: bool = _field(
        True, "run gelu_new as one kernel (models.fused_gelu): faster, less memory")
    cache_reference: bool = _field(
        True, "keep each pair's reference log-probs after their first pass")
    drop_overlong: bool = _field(False, "drop pairs whose prompt fills max_length (else raise)")

    output_dir: str | None = _field(None, "where checkpoint-{step}/ folders go")
    save_steps: int = _field(0, "save a checkpoint every N steps and at the end (0: never)")
    save_total_limit: int | None = _field(None, "keep only the newest K checkpoints of this run")
    overwrite_output_dir: bool = _field(
        False, "replace a run already in output_dir (its checkpoints)")

    def __post_init__(self):
        if isinstance(self.output_dir, os.PathLike):  # a pathlib.Path is a folder name too
            self.output_dir = os.fspath(self.output_dir)
        for spec in fields(self):
            _check_type(spec.name, getattr(self, spec.name), _FIELD_TYPES[spec.type])
        self.output_dir = expand_output_dir(self.output_dir)
        check_loss_settings(self.loss_type, self.beta, self.label_smoothing)  # beta too
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device={self.device!r} is not a device: use 'cpu', 'cuda', "
                                 "'cuda:1', 'mps' or None (the model's device).") from None
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got "
                             f"{self.lr_scheduler!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
                     "max_prompt_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "save_steps", "seed", "logging_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got "
                             f"{self.learning_rate} (LoRA: try 5e-4; full fine-tuning: 1e-6).")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}: 0 would "
                             "zero every gradient and a negative norm reverses them; use None "
                             "for no clipping (1.0 is the usual value).")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value} (1.0 weighs "
                                 "desirable and undesirable examples alike).")
            if value != 1.0 and self.loss_type != "kto":
                raise ValueError(f"{name} weighs KTO's examples; loss_type={self.loss_type!r} "
                                 f"does not use it: leave it at 1.0 or set loss_type='kto'.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout} (0.1 is usual).")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.simpo_gamma < 1e3:
            raise ValueError(f"weight_decay must be in [0, 1) and simpo_gamma >= 0, got "
                             f"{self.weight_decay} and {self.simpo_gamma}.")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                             f"max_length ({self.max_length}), or no response token is left; "
                             "lower max_prompt_length or raise max_length.")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps "
                             f"({self.max_steps}): the learning rate would never reach its "
                             "value; lower warmup_steps.")
        if self.save_steps and self.output_dir is None:
            raise ValueError(f"save_steps={self.save_steps} needs output_dir, the folder where "
                             "checkpoint-{step}/ is written: set output_dir or save_steps=0.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None (keep all), got "
                             f"{self.save_total_limit}.")


# The type each TrainConfig annotation demands (bool is not accepted as an int or float).
_FIELD_TYPES = {float: (float, int), int: (int,), str: (str,), bool: (bool,),
                str | None: (str, type(None)), int | None: (int, type(None)),
                float | None: (float, int, type(None))}


def _check_type(name: str, value, types: tuple) -> None:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types).replace("NoneType", "None")
        raise ValueError(f"TrainConfig.{name} must be {wanted}, got {value!r} "
                         f"({type(value).__name__}).")


def expand_output_dir(output_dir: str | None) -> str | None:
    """`output_dir` with `~` expanded; an empty name is refused."""
    if output_dir is None:
        return None
    if not output_dir.strip():
        raise ValueError("output_dir is an empty name: give a folder, e.g. output_dir='runs/dpo' "
                         "(or None to save nothing).")
    return os.path.expanduser(output_dir)


# The panels of History.plot: (metric or metrics, title, unit).
PANELS = [("loss", "DPO loss", "loss (nats)"),
          ("rewards/accuracies", "reward accuracy", "share of pairs won"),
          ("rewards/margins", "reward margin", "beta x log-ratio (nats)"),
          (("rewards/chosen", "rewards/rejected"), "rewards", "beta x log-ratio (nats)")]


class History(list):
    """A list of per-step metric dicts (TRL's names), with JSON round trips.

    Row `step` k (1, 2, ...) is the k-th optimiser step, numbered as TRL's log and the console
    number it: its training metrics are measured on that step's batch before its update (so the
    first row's policy is the reference), and its held-out metrics, if any, after it.
    """

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(list(self), indent=1))
        return path

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(json.loads(Path(path).read_text()))

    def series(self, key: str) -> tuple[list, list]:
        """(steps, values) of one metric, skipping steps that did not record it."""
        rows = [row for row in self if key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]

    def summary(self, seconds: float, written: list) -> str:
        """The end of a run in a few lines: steps, time, losses, held-out metrics, files."""
        losses = [row["loss"] for row in self]
        tail = losses[-max(1, len(losses) // 10):]  # the last tenth of the steps
        lines = [f"dpo-minimal: done, {len(self)} steps ({seconds:.1f} s in this session); "
                 f"mean loss {sum(losses) / len(losses):.4f} over the run, "
                 f"{sum(tail) / len(tail):.4f} over its last {len(tail)} steps (ln 2 = "
                 f"{math.log(2):.4f} at the start)."]
        held_out = {k[5:]: v for k, v in self[-1].items() if k.startswith("eval/")}
        shown = ("loss", "rewards/accuracies", "rewards/margins")
        if held_out:
            lines.append("  held out at the end: " + ", ".join(
                f"{k} {v:.4f}" for k, v in held_out.items() if k in shown))
        lines.append("  wrote " + ", ".join(str(p) for p in written))
        return "\n".join(lines)

    def plot(self, path=None, figure=None, title: str = "dpo-minimal training metrics"):
        """Loss, accuracy, margin and rewards against the step, held-out values as markers.

        Draws into `figure` (a new matplotlib Figure, without pyplot's global state, if None);
        with `path`, saves a PNG there and returns the path, else returns the figure.
        """
        if figure is None:
            from matplotlib.figure import Figure

            figure = Figure(figsize=(10, 6.5))
        for i, (keys, name, unit) in enumerate(PANELS):
            ax = figure.add_subplot(2, 2, i + 1)
            for key in (keys,) if isinstance(keys, str) else keys:
                steps, values = self.series(key)
                ax.plot(steps, values, label=f"train {key.split('/')[-1]}")
                steps, values = self.series(f"eval/{key}")
                if steps:
                    ax.plot(steps, values, "o--", label=f"held-out {key.split('/')[-1]}")
            if keys == "loss":
                ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2")
            ax.set(title=name, xlabel="optimiser step", ylabel=unit)
            ax.legend(fontsize=8)
        figure.suptitle(title)
        figure.tight_layout()
        if path is None:
            return figure
        figure.savefig(path, dpi=120)
        return Path(path)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or weight."""


def _divergence_fix(config: "TrainConfig") -> str:
    """The likely cause of a non-finite value in a run with this config, and the fix."""
    if config.dtype == "float16":
        return ("likely a float16 overflow (e.g. phi-2 attention in float16 with 'eager' "
                "attention) or a too-high learning rate. Use attn_implementation='sdpa', "
                "bfloat16 on Ampere or newer (or float32), or a lower learning_rate.")
    return (f"the run diverged, most likely because learning_rate={config.learning_rate:g} is "
            "too high for it (LoRA: try 5e-4 or lower; full fine-tuning: 1e-6). Start again "
            "with a lower learning_rate (a new output_dir, or overwrite_output_dir=True); "
            "max_grad_norm (clipping) also guards against single large gradients.")


# --- checks of the model and data, before any work ---------------------------------------------


def _check_token_ids(model, tokenizer, pairs: list[dict]) -> None:
    """Every token id (the pad id too) indexes a row of the model's input embedding."""
    rows = model.get_input_embeddings().num_embeddings
    top = max(max((max(ids, default=0) for key, ids in pair.items() if key.endswith("_ids")),
                  default=0) for pair in pairs)
    top = max(top, tokenizer.pad_token_id)
    if top >= rows:
        raise ValueError(f"the tokenizer gives token id {top}, but the model's embedding has "
                         f"only {rows} rows: the tokenizer is not this model's. Use the model's "
                         "own tokenizer, or after adding tokens call "
                         "model.resize_token_embeddings(len(tokenizer)).")


def _check_weights_loaded(model) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device (sized, never loaded), so "
                         "there is nothing to train: load real weights, e.g. with "
                         "from_pretrained(...) or load_model(...), not init_empty_weights().")


def _check_adapter(model, dropout: float = 0.0) -> None:
    """A LoRA model trains its adapters, and its reference is the same model with them off."""
    if not _is_peft(model):
        return
    if dropout:  # the adapter-off pass, the reference, would get the same dropout noise
        raise ValueError(f"dropout={dropout} is for full fine-tuning: a LoRA model's reference "
                         "is its own forward pass with the adapter off; use add_lora's dropout "
                         "(LoRA dropout) instead.")
    for name, config in model.peft_config.items():
        alphas = [getattr(config, "lora_alpha", 1), *getattr(config, "alpha_pattern", {}).values()]
        if min(alphas) <= 0:
            raise ValueError(f"LoRA adapter {name!r} has lora_alpha={min(alphas)}: its update "
                             "is scaled by alpha / r, so it would train nothing (or backwards); "
                             "use alpha > 0, e.g. 2 * r (add_lora's default is 32 for r = 16).")
    base = [n for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n and "modules_to_save" not in n]
    if base:
        raise ValueError(f"base weights require grad ({', '.join(base[:3])}"
                         f"{', ...' if len(base) > 3 else ''}), but the reference is this model "
                         "with its adapter disabled, so it would move with them: freeze them "
                         "(p.requires_grad_(False)), list those modules in LoraConfig("
                         "modules_to_save=...), or train without LoRA (full fine-tuning).")


def _device(config: TrainConfig, model) -> torch.device:
    """The run's device, and a clear error where it cannot be used (before torch's own)."""
    base = (model.get_base_model() if _is_peft(model) else model).config
    context = getattr(base, "n_positions", None) or getattr(base, "max_position_embeddings", None)
    if context is not None and config.max_length > context:
        raise ValueError(f"max_length={config.max_length} exceeds the model's context of "
                         f"{context} tokens: lower max_length to at most {context}.")
    if config.device is None:
        return next(model.parameters()).device
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but this machine has no CUDA GPU: use "
                         "device='cpu' (or None), or run on a GPU runtime.")
    return device


def read_options_file(path: Path, kinds: dict[str, type]) -> dict:
    """The options in a YAML or JSON file (UTF-8), keys normalised to option names (dashes ok),
    each checked against `kinds` (name -> type). A string where a float is due (YAML 1.1 reads
    1e-4 as one) is converted. Raises ValueError naming the file and the problem."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the YAML or JSON file of options "
                         "inside it (e.g. options.yaml).")
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8; "
                         "save the file as UTF-8.") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # yaml and json raise their own error types
        raise ValueError(f"{path} is not valid {'YAML' if yaml_file else 'JSON'}: "
                         f"{err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got a "
                         f"{type(values).__name__}.")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    known = set(kinds)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; the options are "
                         f"the flags of `dpo-minimal train --help` ({', '.join(sorted(known))}).")
    for name, kind in kinds.items():
        value = values.get(name)
        if kind is float and isinstance(value, str):
            try:  # YAML 1.1 has no exponent without a dot: it reads 1e-4 as a string
                value = values[name] = float(value)
            except ValueError:
                pass
        if name == "lora_targets" and isinstance(value, list):  # a YAML list of names
            continue
        if value is not None and not (kind is bool if isinstance(value, bool) else (
                isinstance(value, kind) or (kind is float and isinstance(value, int)))):
            raise ValueError(f"{path}: {name} must be {kind.__name__}, got {value!r}.")
    return values


def _value_type(annotation) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a TrainConfig annotation such as `float | None`."""
    if isinstance(annotation, types.UnionType):
        kinds = [a for a in annotation.__args__ if a is not type(None)]
        return kinds[0], True
    return annotation, False


def _converter(kind: type, optional: bool):
    """argparse's type for a field: `kind`, or for an optional field also 'none' for None."""
    if not optional:
        return kind

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = f"{kind.__name__} or none"  # argparse names it in its errors
    return convert
