"""generate_pairs ends a completion at the prompt format's next turn (stop strings)."""

import torch

from dpo_minimal import add_lora, tiny_model
from dpo_minimal.adapters import generate_pairs


def test_stop_strings_end_the_completion_where_the_model_writes_one():
    torch.set_num_threads(1)
    model, tokenizer = tiny_model("gpt2", pretrained=True)
    model = add_lora(model)
    prompt = "Question: What is the capital of France?\nAnswer:"
    full = generate_pairs(model, tokenizer, [prompt], max_new_tokens=32)[0]
    stop = "."
    assert all(stop in full[key] for key in ("reference (greedy)", "policy (greedy)")), full
    stopped = generate_pairs(model, tokenizer, [prompt], max_new_tokens=32,
                             stop_strings=[stop])[0]
    for key in ("reference (greedy)", "policy (greedy)"):  # greedy: the same text, cut short
        assert stopped[key] == full[key].split(stop)[0].strip()
        assert stop not in stopped[key] and stopped[key]
