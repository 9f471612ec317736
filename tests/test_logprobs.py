
"""sequence_logps: a by-hand sum, and independence from padding and batch composition."""

import torch

from dpo_minimal import collate_pairs, sequence_logps, tiny_model, tokenize_preferences


def test_equals_a_sum_written_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    expected = torch.zeros(2)
    for b in range(2):
        for t in range(1, 6):
            if mask[b, t]:
                # logits at t-1 predict the token at t
                p = torch.exp(logits[b, t - 1]) / torch.exp(logits[b, t - 1]).sum()
                expected[b] += torch.log(p[labels[b, t]])
    torch.testing.assert_close(sequence_logps(logits, labels, mask), expected)
    torch.testing.assert_close(
        sequence_logps(logits, labels, mask, average=True), expected / mask[:, 1:].sum(-1)
    )


def test_half_precision_logits_are_reduced_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7).to(torch.bfloat16)
    labels, mask = torch.randint(0, 7, (1, 5)), torch.ones(1, 5, dtype=torch.long)
    out = sequence_logps(logits, labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sequence_logps(logits.float(), labels, mask))


def _pair(tok, prompt, chosen, rejected):
    example = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return tokenize_preferences([example], tok, max_length=64, max_prompt_length=32)[0]


def test_same_value_alone_and_inside_a_padded_batch():
    for arch in ("gpt2", "phi"):
        model, tok = tiny_model(arch)
        short = _pair(tok, "Is the sky blue?", " Yes, on a clear day.", " No.")
        long = _pair(tok, "Explain in detail why we see a rainbow after rain on a sunny day.",
                     " Sunlight is refracted and reflected inside raindrops, splitting colours.",
                     " Rainbows are painted by the clouds themselves.")

        def logps(pairs):
            batch = collate_pairs(pairs, tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

        alone = logps([short])  # (chosen, rejected)
        batched = logps([long, short, long])  # short sits at rows 1 and 4, padded
        torch.testing.assert_close(batched[[1, 4]], alone, atol=1e-5, rtol=0)
