"""LoRA adapters: save and load them (refusing one that does not fit), and sample from the
policy and its reference (the adapter switched off) side by side."""

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from .logprobs import _is_peft


def generate_pairs(model, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                   seed: int = 0, temperature: float = 0.7,
                   stop_strings: list[str] | None = None) -> list[dict]:
    """Reference (adapter disabled) and policy completions side by side, greedy and sampled.

    Returns one dict per prompt: prompt, reference (greedy), policy (greedy), reference
    (sampled), policy (sampled). Sampling is seeded, so the table is reproducible on one machine.
    `stop_strings` (e.g. the prompt format's next turn, "\nInstruct:") end a completion where
    the model starts one of them (transformers' `generate(stop_strings=...)`), and the stop
    string itself is cut from the text: a base model otherwise writes the next turn itself.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        row = {"prompt": prompt}
        for label, sample in (("greedy", False), ("sampled", True)):
            for who in ("reference", "policy"):
                torch.manual_seed(seed)
                context = model.disable_adapter() if who == "reference" else nullcontext()
                kwargs = dict(do_sample=True, temperature=temperature, top_k=50) if sample else {}
                if stop_strings:
                    kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
                with context, torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, **kwargs)
                new = out[0, inputs["input_ids"].shape[1]:]
                text = tokenizer.decode(new, skip_special_tokens=True)
                for stop in stop_strings or ():
                    text = text.split(stop)[0]
                row[f"{who} ({label})"] = text.strip()
        rows.append(row)
    model.train(was_training)
    return rows


def _base_config(model):
    return (model.get_base_model() if _is_peft(model) else model).config


def save_adapter(model, path) -> Path:
    """Save only the LoRA weights (safetensors) and adapter config to `path`.

    Also writes dpo_minimal.json (the base model's family and size), so that `load_adapter`
    can tell a user which model an adapter belongs to.
    """
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    config = _base_config(model)
    meta = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}
    (path / "dpo_minimal.json").write_text(json.dumps(meta, indent=1))
    return path


def load_adapter(base_model, path):
    """Put a saved adapter back on a fresh base model: a peft model in eval mode.

    Refuses, naming the difference, an adapter made for another family, another number of
    layers or other widths (peft would load what matches and silently skip the rest).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not an adapter folder (no adapter_config.json): pass a "
                         "folder written by save_adapter, or a checkpoint's adapter/.")
    config = _base_config(base_model)
    have = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}
    meta = path / "dpo_minimal.json"
    saved = json.loads(meta.read_text()) if meta.is_file() else {}
    diff = {k: (saved[k], have[k]) for k in have if k in saved and saved[k] != have[k]}
    if diff:
        what = ", ".join(f"{k} {a} (adapter) vs {b} (this model)" for k, (a, b) in diff.items())
        raise ValueError(f"the adapter in {path} was trained on another base model: {what}. "
                         "Load it onto the model it was trained with.")
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    try:
        model = PeftModel.from_pretrained(base_model, path)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the adapter in {path} does not fit this model ({have}): "
                         f"{str(err)[:300]}") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    extra = sorted(set(shapes) - set(expected))
    wrong = {k: (shapes[k], expected[k]) for k in shapes if k in expected and
             shapes[k] != expected[k]}
    if extra or wrong:
        raise ValueError(f"the adapter in {path} does not fit this model ({have}): "
                         f"{len(extra)} adapter weights have no module here, e.g. {extra[:2]}; "
                         f"{len(wrong)} have other shapes, e.g. {list(wrong.items())[:2]}.")
    return model.eval()
